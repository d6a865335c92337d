"""The ONNX graph clean-up of ``seqapps export``: names given after the passes, without clashes."""

from __future__ import annotations

from onnxscript import ir

from seqapps.export import name_graph_values


def test_inputs_and_outputs_take_their_names_and_a_clashing_value_steps_aside():
    x = ir.Value(name="input_0")
    relu = ir.node("Relu", [x])
    relu.outputs[0].name = "y"               # an inner value already called like the output
    out = ir.node("Identity", [relu.outputs[0]])
    out.outputs[0].name = "identity_1"
    graph = ir.Graph([x], [out.outputs[0]], nodes=[relu, out])
    name_graph_values(graph, ["x"], ["y"])
    assert [v.name for v in graph.inputs] == ["x"] and [v.name for v in graph.outputs] == ["y"]
    assert relu.outputs[0].name == "y_internal"
    names = [v.name for v in (*graph.inputs, *(o for n in graph for o in n.outputs))]
    assert len(names) == len(set(names))
