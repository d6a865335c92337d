"""Gated linear attention: the ``chunk`` backend and the fused C kernel (``cpu``) against the
``recurrent`` oracle, and the public op's input checks.

Outputs, final states and the gradients of every input (``initial_state`` included) are
compared by relative RMS error (``kernel_harness``), for both gate forms (a log decay per key
dimension ``[B, T, H, K]`` and one per head ``[B, T, H]``), over shapes with T = 1, a partial
last chunk, H = 1 and K ≠ V, in float32 and bfloat16. Then: cutting a sequence and carrying the
state, extreme gates over a long sequence, gradcheck in float64, torch.compile and torch.export.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_harness import assert_matches, rel_rms, run_with_grads

from seqapps.errors import InputError
from seqapps.kernels.gla import gated_linear_attention, gla_recurrent
from seqapps.kernels.gla_chunk import gla_chunk, gla_chunk_reference
from seqapps.kernels.gla_cpu import available as cpu_kernel_available

# Measured worst relative RMS errors over these cases and 3 seeds: 1e-6 in float32 (d_g; 4e-7 for
# the rest), 2e-4 in bfloat16 (both backends accumulate in float32 and round the outputs and
# gradients to bf16 alike). With log decays down to -20 per step, float32 chunk against float64:
# up to 5e-6 over 8 seeds (cumulative log decays of ~1e3 inside a chunk cost float32 digits).
FP32_TOL = 1e-5
BF16_TOL = 1e-2
EXTREME_TOL = 2e-5
GATES = ["per-key", "per-head"]
CPU_KERNEL = pytest.param("cpu", marks=pytest.mark.skipif(not cpu_kernel_available(),
                                                          reason="no C compiler: the fused CPU kernel is not built"))
FAST_BACKENDS = ["chunk", CPU_KERNEL]


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, gate: str, dtype: torch.dtype = torch.float32,
                log_decay_range: tuple[float, float] = (-2.0, -0.01), with_state: bool = True,
                seed: int = 0) -> dict:
    """Random inputs of the public op, log decays log-uniform in ``log_decay_range``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    low, high = (math.log(-x) for x in log_decay_range)
    gate_shape = (b, t, h, dk) if gate == "per-key" else (b, t, h)
    g = -torch.exp(torch.rand(gate_shape, generator=gen) * (high - low) + low)
    state = torch.randn(b, h, dk, dv, generator=gen) if with_state else None
    inputs = {"q": q, "k": k, "v": v, "g": g, "initial_state": state}
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


SHAPES = {  # (B, T, H, K, V, chunk_size, with an initial state)
    "T=1": (2, 1, 2, 8, 8, 16, True),
    "H=1, K>V, tail chunk": (1, 37, 1, 16, 8, 16, True),
    "K<V, tail chunk": (2, 50, 3, 8, 12, 16, True),
    "chunk 64, tail": (1, 150, 2, 16, 16, 64, True),
    "chunk 24 -> 32": (1, 70, 2, 8, 8, 24, True),
    "no initial state": (2, 33, 2, 8, 8, 8, False),
    "K=64, V=48, 3 chunks of 64": (1, 150, 2, 64, 48, 64, True),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_recurrent(shape, gate, dtype, backend):
    *dims, chunk_size, with_state = shape
    inputs = make_inputs(*dims, gate=gate, dtype=dtype, with_state=with_state)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_matches(lambda **kw: gated_linear_attention(**kw, chunk_size=chunk_size), inputs, backend, tol)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_out_of_place_chunk_form_matches_recurrent(shape, gate):
    """``gla_chunk_reference``: what the exporters trace, gradients included (autograd through it)."""
    *dims, chunk_size, with_state = shape
    inputs = make_inputs(*dims, gate=gate, with_state=with_state)

    def op(backend, q, k, v, g, initial_state, output_final_state):
        if backend == "recurrent":
            return gated_linear_attention(q, k, v, g, None, initial_state, output_final_state, backend="recurrent")
        return gla_chunk_reference(q, k, v, g, k.shape[-1] ** -0.5, initial_state, output_final_state, chunk_size)

    assert_matches(op, inputs, "chunk_reference", FP32_TOL)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_keeps_dtypes(gate, backend):
    inputs = make_inputs(1, 20, 2, 8, 8, gate=gate, dtype=torch.bfloat16)
    out, state = gated_linear_attention(**inputs, output_final_state=True, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 20, 2, 8)
    assert state.dtype == torch.float32 and state.shape == (1, 2, 8, 8)
    assert gated_linear_attention(**inputs, backend=backend)[1] is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("cuts", [[1], [16], [23], [5, 40, 41], [63]])
def test_cutting_and_carrying_the_state_changes_nothing(gate, cuts, backend):
    """Running the pieces one after the other, each starting from the state the previous one
    left, gives the outputs and final state of the whole sequence (float64 for ``chunk``; the C
    kernel computes in float32)."""
    dtype, tol = (torch.float64, 1e-12) if backend == "chunk" else (torch.float32, 1e-6)
    inputs = make_inputs(2, 64, 2, 8, 6, gate=gate, dtype=dtype)
    whole, whole_state = gated_linear_attention(**inputs, output_final_state=True, backend=backend, chunk_size=16)
    state, pieces = inputs["initial_state"], []
    for start, stop in zip([0, *cuts], [*cuts, 64]):
        piece = {name: inputs[name][:, start:stop] for name in ("q", "k", "v", "g")}
        out, state = gated_linear_attention(**piece, initial_state=state, output_final_state=True,
                                            backend=backend, chunk_size=16)
        pieces.append(out)
    assert rel_rms(torch.cat(pieces, 1), whole) < tol
    assert rel_rms(state, whole_state) < tol


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_extreme_gates_stay_finite_and_exact(gate, backend):
    """Log decays anywhere in [-20, -1e-4] per step: no exp may overflow (that would give inf
    or NaN), over T = 8192 with the default chunks of 64; on a 256-step slice the float32 chunk
    matches the float64 recurrence. (In the C kernel these decays send most blocks of 16 to the
    exact diagonal.)"""
    inputs = make_inputs(1, 8192, 1, 8, 8, gate=gate, log_decay_range=(-20.0, -1e-4), seed=1)
    result = run_with_grads(lambda **kw: gated_linear_attention(**kw, backend=backend), inputs)
    for name, value in result.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"

    short = {name: x[:, :256] if name != "initial_state" else x for name, x in inputs.items()}
    exact = run_with_grads(lambda **kw: gla_recurrent(**kw, scale=8 ** -0.5),
                           {name: x.double() for name, x in short.items()})
    got = run_with_grads(lambda **kw: gated_linear_attention(**kw, backend=backend), short)
    errors = {name: rel_rms(got[name], exact[name]) for name in exact}
    assert max(errors.values()) < EXTREME_TOL, errors


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_gradcheck(gate, chunk_size):
    """Float64 finite differences for every input, with a partial last chunk; chunks of 16
    also go through the matmul blocks of the per-key tiling."""
    inputs = make_inputs(1, 19, 1, 3, 2, gate=gate, dtype=torch.float64, seed=2)
    leaves = [x.requires_grad_() for x in inputs.values()]

    def chunked(q, k, v, g, initial_state):
        return gla_chunk(q, k, v, g, 0.7, initial_state, True, chunk_size)

    assert torch.autograd.gradcheck(chunked, leaves)


def test_chunk_size_must_be_positive():
    inputs = make_inputs(1, 8, 1, 4, 4, gate="per-key")
    with pytest.raises(InputError, match="chunk_size"):
        gated_linear_attention(**inputs, backend="chunk", chunk_size=0)


BAD_INPUTS = {
    "g per key with the wrong K": ({"g": torch.zeros(1, 8, 2, 5)}, "g has shape"),
    "g with a time axis too short": ({"g": torch.zeros(1, 7, 2)}, "g has shape"),
    "initial_state with K and V swapped": ({"initial_state": torch.zeros(1, 2, 6, 4)}, "initial_state has shape"),
    "initial_state without the batch": ({"initial_state": torch.zeros(2, 4, 6)}, "initial_state has shape"),
    "unknown backend": ({"backend": "fast"}, "backend='fast'"),
    "integer q": ({"q": torch.ones(1, 8, 2, 4, dtype=torch.long)}, "q has dtype torch.int64; expected floating"),
    "q as a list": ({"q": torch.zeros(1, 8, 2, 4).tolist()}, "q is a list; expected a torch.Tensor"),
    "q without the batch": ({"q": torch.zeros(8, 2, 4)}, "q has shape [8, 2, 4]"),
}


@pytest.mark.parametrize("change, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_one_line(change, message):
    inputs = {**make_inputs(1, 8, 2, 4, 6, gate="per-key", with_state=False), **change}
    with pytest.raises(InputError) as error:
        gated_linear_attention(**inputs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


class _Attention(torch.nn.Module):
    """The op inside a module, as a backbone would call it."""

    def forward(self, q, k, v, g, state):
        return gated_linear_attention(q, k, v, g, initial_state=state, output_final_state=True,
                                      backend="chunk", chunk_size=8)


def _compile_check(backend: str, gate: str) -> None:
    inputs = dict(zip(("q", "k", "v", "g", "state"), make_inputs(1, 20, 2, 4, 3, gate=gate).values()))
    eager, compiled = _Attention(), torch.compile(_Attention(), backend=backend)
    expected = run_with_grads(lambda output_final_state, **kw: eager(**kw), inputs)
    got = run_with_grads(lambda output_final_state, **kw: compiled(**kw), inputs)
    errors = {name: rel_rms(got[name], expected[name]) for name in expected}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("gate", GATES)
def test_torch_compile_traces_the_chunk_backend(gate):
    """Dynamo and AOT autograd (with the hand-written backward), without code generation."""
    _compile_check("aot_eager", gate)


@pytest.mark.slow
def test_torch_compile_inductor():
    _compile_check("inductor", "per-key")


@pytest.mark.parametrize("gate", GATES)
def test_torch_export(gate):
    inputs = make_inputs(1, 20, 2, 4, 3, gate=gate)
    args = tuple(inputs.values())
    exported = torch.export.export(_Attention(), args)
    out, state = exported.module()(*args)
    expected_out, expected_state = _Attention()(*args)
    assert rel_rms(out, expected_out) < 1e-6 and rel_rms(state, expected_state) < 1e-6
