"""``seqapps export``: a checkpoint -> a self-contained export folder.

A recurrent model (one with ``step`` and ``init_state``: a stack of streaming mixers, an image
backbone that takes its image column by column) also gets ``step.onnx``: one ``step`` with the
state as explicit inputs and outputs, checked with onnxruntime against PyTorch over a whole
example sequence, step after step.

The folder is written under a temporary name and renamed into place when complete, so a
failed export (an ONNX graph that disagrees with PyTorch, say) leaves nothing half-written.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

import seqapps
from seqapps.errors import InputError
from seqapps.runs import load_module, run_test_metrics


def export_checkpoint(ckpt: str | Path, out: str | Path, tolerance: float = 1e-4,
                      metrics: dict | None = None) -> dict:
    """Write ``config.yaml``, ``model.safetensors``, ``model.onnx`` (checked against PyTorch
    with onnxruntime), for a recurrent model ``step.onnx`` (see :func:`export_step_onnx`), and
    ``README.md`` for ``ckpt`` into the folder ``out``.

    ``metrics`` (for the model card and ``config.yaml``): by default the test metrics of the
    checkpoint's run, when it was tested.

    Returns a summary: the folder, the largest ONNX difference (of both files), the parameter count.
    """
    metrics = run_test_metrics(ckpt) if metrics is None else metrics
    module = load_module(ckpt)
    model = module.export_module().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        inputs = module.example_inputs()
        input_names, output_names = module.io_names()
        max_diff = export_onnx(model, inputs, tmp / "model.onnx", input_names, output_names)
        if not max_diff <= tolerance:
            raise InputError(f"ONNX export disagrees with PyTorch: largest difference {max_diff:.3g} "
                             f"> tolerance {tolerance:g}; nothing was written")
        step = None
        tokens = step_tokens(module, model, inputs)
        if tokens is not None:
            step = export_step_onnx(model, tokens, tmp / "step.onnx", f"{input_names[0]}_t", f"{output_names[0]}_t")
            if not step["onnx_max_diff"] <= tolerance:
                raise InputError(f"ONNX export of step disagrees with PyTorch over {step['steps_checked']} steps: "
                                 f"largest difference {step['onnx_max_diff']:.3g} > tolerance {tolerance:g}; "
                                 "nothing was written")
        n_params = sum(p.numel() for p in model.parameters())
        config = {
            "seqapps_version": seqapps.__version__,
            "model": module.export_spec(),
            "data": module.data_info,
            "predictor": module.predictor,
            "inputs": {n: [None, *t.shape[1:]] for n, t in zip(input_names, inputs)},
            "outputs": output_names,
            "parameters": n_params,
            "onnx_max_diff": max_diff,
            **({"step": step} if step else {}),
            "checkpoint": str(Path(ckpt).resolve()),
            "metrics": metrics or {},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "README.md").write_text(model_card(config))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if step:
        max_diff = max(max_diff, step["onnx_max_diff"])
    return {"folder": str(out), "onnx_max_diff": max_diff, "parameters": n_params, "step": step is not None}


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str]) -> float:
    """Export with a dynamic batch dimension; return the largest difference between
    onnxruntime and PyTorch (``max_scaled_diff``) on inputs of another batch size than the traced one."""
    session = _to_onnx(model, inputs, path, input_names, output_names)
    check = tuple(torch.cat([t, t[:1] * 0.5]) for t in inputs)  # batch size + 1
    with torch.no_grad():
        expected = model(*check)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = session.run(None, {n: t.numpy() for n, t in zip(input_names, check)})
    return max_scaled_diff(got, expected)


def _to_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
             output_names: list[str]):
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension; an onnxruntime session of it."""
    import onnxruntime as ort

    dynamic = batch_dynamic_shapes(model, len(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=dynamic, optimize=False,
                                    verbose=False)
        simplify_onnx(program.model)
        # named after the passes: an output that is an input unchanged (a state passed through)
        # then has its own Identity node, so the two keep their own names
        name_graph_values(program.model.graph, input_names, output_names)
        program.save(str(path), external_data=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def name_graph_values(graph, input_names: list[str], output_names: list[str]) -> None:
    """Give the graph's inputs and outputs these names (in order), renaming any other value that
    already holds one of them."""
    wanted = dict(zip([*graph.inputs[:len(input_names)], *graph.outputs[:len(output_names)]],
                      [*input_names, *output_names]))
    taken = set(wanted.values())
    for value in [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]:
        if value not in wanted and value.name in taken:
            value.name = f"{value.name}_internal"
    for value, name in wanted.items():
        value.name = name


def simplify_onnx(model) -> None:
    """The exporter's graph optimisation, in place, without its pattern rewriter: functions
    inlined, constants folded, unused nodes and repeated subexpressions removed, constants
    lifted to initializers. The rewriter took minutes on the unrolled scans of the 2-D SSM
    (64 of the 99 s on the anomaly model's 9210 nodes; over 10 minutes on a 21 x 96 Chimera
    forecaster), the rest well under a second; onnxruntime fuses what it can when it loads."""
    from onnxscript import ir, optimizer

    passes = optimizer.common_passes
    passes.InlinePass()(model)
    optimizer.fold_constants_ir(model)
    ir.passes.Sequential(
        passes.RemoveUnusedNodesPass(), passes.RemoveUnusedFunctionsPass(),
        passes.RemoveUnusedOpsetsPass(), passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(), passes.OutputFixPass(), passes.NameFixPass())(model)


def max_scaled_diff(got, expected) -> float:
    """The largest ``|got - expected| / max(1, |expected|)`` over pairs of arrays/tensors: an
    absolute difference for values up to 1 and a relative one beyond (a forecast in lux or
    pascals differs from float32 rounding alone by more than any fixed absolute tolerance).
    Equal infinities (an empty running maximum, a log-normaliser before any token) count as equal."""
    worst = 0.0
    for g, e in zip(got, expected):
        e = e.detach().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
        g = np.asarray(g)
        scaled = np.abs(np.where(g == e, 0.0, g - e)) / np.maximum(1.0, np.abs(e))
        worst = max(worst, float(np.max(scaled, initial=0.0)))
    return worst


def step_tokens(module, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The example input as the sequence of pieces ``model.step`` takes, ``[B, T, ...]``, or
    ``None`` when the model is not recurrent. The task says it with ``example_step_inputs()``
    (``None``: no step); otherwise a model with ``step`` and ``init_state`` (and not
    ``streams = False``) steps through its first input along dim 1 (``[B, T, C] -> x_t [B, C]``)."""
    hook = getattr(module, "example_step_inputs", None)
    if callable(hook):
        return hook()
    recurrent = callable(getattr(model, "step", None)) and callable(getattr(model, "init_state", None))
    if not recurrent or not getattr(model, "streams", True) or inputs[0].ndim < 3:
        return None
    return inputs[0]


def export_step_onnx(model: torch.nn.Module, tokens: torch.Tensor, path: Path, input_name: str = "x_t",
                     output_name: str = "y_t", max_steps: int = 16) -> dict:
    """Write ``model.step`` as ONNX: ``(x_t, state_0 .. state_{n-1}) -> (y_t, next_state_0 ..
    next_state_{n-1})`` with a dynamic batch (the state from ``model.init_state(batch)``), and
    check it with onnxruntime against PyTorch: both run ``tokens [B, T, ...]`` (and one more
    sample, so another batch size than the traced one) step by step from the initial state,
    each feeding its own state back; every output and state is compared at every step (the
    first ``max_steps`` steps).

    Returns what ``config.yaml`` records: the input and output names and shapes, the steps
    checked, the largest difference.
    """
    from seqapps.backbones.streaming import StepModule

    wrapper = StepModule(model).eval()
    state = tuple(model.init_state(tokens.shape[0]))
    input_names = [input_name, *(f"state_{i}" for i in range(len(state)))]
    output_names = [output_name, *(f"next_state_{i}" for i in range(len(state)))]
    session = _to_onnx(wrapper, (tokens[:, 0], *state), path, input_names, output_names)

    check = torch.cat([tokens, tokens[:1] * 0.5])  # batch size + 1
    torch_state = ort_state = tuple(model.init_state(check.shape[0]))
    steps, worst = min(check.shape[1], max_steps), 0.0
    with torch.no_grad():
        for t in range(steps):
            expected = wrapper(check[:, t], *torch_state)
            got = session.run(None, {n: v.numpy() if isinstance(v, torch.Tensor) else v
                                     for n, v in zip(input_names, (check[:, t], *ort_state))})
            worst = max(worst, max_scaled_diff(got, expected))
            torch_state, ort_state = tuple(expected[1:]), tuple(got[1:])
    shapes = {n: [None, *t.shape[1:]] for n, t in zip(input_names, (tokens[:, 0], *state))}
    return {"inputs": shapes, "outputs": output_names, "steps_checked": steps, "onnx_max_diff": worst}


def batch_dynamic_shapes(model: torch.nn.Module, n_inputs: int) -> tuple:
    """``dynamic_shapes`` marking dim 0 of every input as the batch, laid out as ``forward``'s
    signature (a ``*state`` parameter takes a nested tuple, as ``torch.export`` wants)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    specs: list = []
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            specs.append(tuple({0: batch} for _ in range(n_inputs - len(specs))))
            break
        if len(specs) < n_inputs:
            specs.append({0: batch})
    return tuple(specs)


def replace_folder(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``, replacing an older export there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def step_card(step: dict | None) -> list[str]:
    """The model card's section on ``step.onnx`` (none for a model that is not recurrent)."""
    if not step:
        return []
    x_name, *state_names = step["inputs"]
    y_name, *next_names = step["outputs"]
    return [
        "## Streaming: `step.onnx`",
        "",
        f"One step of the recurrent model, the state as explicit tensors: `({x_name}, {', '.join(state_names)})` "
        f"-> `({y_name}, {', '.join(next_names)})`; feed `next_state_i` back as `state_i`. Memory is constant "
        "in the length of the stream.",
        "",
        f"- Inputs: {step['inputs']} (`None`: the batch)",
        "- The first state is `seqapps.load('this/folder').init_state(batch)` (zeros, and `-inf` where "
        "a running maximum or log-normaliser starts), or the same arrays built in numpy from these shapes",
        f"- Checked against PyTorch's `step` with onnxruntime over {step['steps_checked']} steps, each side "
        f"feeding back its own state: largest difference {step['onnx_max_diff']:.2e}",
        "",
        "```python",
        "import onnxruntime as ort, seqapps",
        "session = ort.InferenceSession('step.onnx')",
        "state = [s.numpy() for s in seqapps.load('this/folder').init_state(batch)]",
        "for x_t in pieces:                       # the input, one step at a time",
        f"    y_t, *state = session.run(None, {{'{x_name}': x_t, **{{f'state_{{i}}': s for i, s in enumerate(state)}}}})",
        "```",
        "",
    ]


def data_card(data: dict) -> list[str]:
    """The card's data line from the facts the data module recorded: a forecaster's columns,
    target and features, or a classifier's classes; whatever of them is there."""
    facts = [f"{key.replace('_', ' ')} {', '.join(map(str, value)) if isinstance(value, list | tuple) else value}"
             for key in ("columns", "class_names") if (value := data.get(key)) is not None]
    facts += [f"{key} `{data[key]}`" for key in ("target", "features") if data.get(key) is not None]
    return [f"- Data: {data.get('source', 'unknown')}" + (f" — {'; '.join(facts)}" if facts else "")]


def model_card(config: dict) -> str:
    data, model = config["data"], config["model"]
    net = model.get("net", model)
    lines = [
        f"# {net['_target_'].rsplit('.', 1)[-1]} — exported by seqapps {config['seqapps_version']}",
        "",
        f"- Model: `{model['_target_']}` ({config['parameters']:,} parameters)",
        *data_card(data),
        f"- Input `{next(iter(config['inputs']))}`: {config['inputs']} (raw units; scaling is inside)",
        f"- Output: {config['outputs']}" + (f" — the next {data['pred_len']} steps" if data.get("pred_len") else ""),
        f"- ONNX checked against PyTorch with onnxruntime: largest |Δ| / max(1, |y|) {config['onnx_max_diff']:.2e}",
        "",
        "## Metrics (test split)",
        "",
    ]
    metrics = config.get("metrics") or {}
    lines += [f"- `{k}`: {v:.4f}" for k, v in sorted(metrics.items())] or ["- (not measured)"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import seqapps, torch",
        "model = seqapps.load('this/folder')      # plain PyTorch, no Lightning or Hydra",
        f"forecast = model(history)               # history: [batch, {data.get('seq_len')}, {data.get('n_in')}]",
        "```",
        "",
        "or with onnxruntime: `InferenceSession('model.onnx').run(None, {'history': x})`.",
        "",
        *step_card(config.get("step")),
        "Model specification:",
        "",
        "```json",
        json.dumps(net, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
