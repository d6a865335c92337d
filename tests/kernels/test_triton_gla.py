"""The Triton GLA kernels against the ``recurrent`` oracle, on the CPU under TRITON_INTERPRET=1
(or on a GPU when one is there and ``TRITON_INTERPRET=0`` is set).

The interpreter runs every kernel program in Python, so the shapes are small (T <= 70,
K, V <= 32, B·H <= 4). Most cases call ``gla_triton`` with chunks of 32 steps, so that a
40-step sequence already has an inter-chunk state, a partial last chunk, intra-chunk
sub-blocks off and on the diagonal; one case goes through the public op with its default
chunks of 64. Errors are relative RMS (``kernel_harness``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import assert_matches, triton_test_device

DEVICE = triton_test_device()


from seqapps.errors import InputError  # noqa: E402
from seqapps.kernels.gla import gated_linear_attention, gla_recurrent  # noqa: E402
from seqapps.kernels.triton.gla import gla_triton  # noqa: E402

# Measured relative RMS errors (worst over a few seeds, always d_g, the others 2-10x lower):
FP32_TOL = 1e-5           # ~1e-6
STRONG_DECAY_TOL = 3e-5   # ~5e-6 with decays down to -20 per step (1e-5 with chunks of 64)
BF16_TOL = 2e-2           # ~9e-3 (the matrix products take bf16 operands)
FP16_TOL = 3e-3           # ~7e-4


def make_inputs(B, T, H, K, V, *, per_key=True, dtype=torch.float32, initial_state=True,
                min_log_decay=None, seed=0) -> dict:
    """Random ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, a log decay ``g`` (``[B, T, H, K]`` or
    ``[B, T, H]``; typical GLA gates, or uniform in ``[min_log_decay, 0]``) and an fp32 state."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {"q": torch.randn(B, T, H, K, generator=gen).to(dtype),
              "k": torch.randn(B, T, H, K, generator=gen).to(dtype),
              "v": torch.randn(B, T, H, V, generator=gen).to(dtype)}
    gate_shape = (B, T, H, K) if per_key else (B, T, H)
    if min_log_decay is None:
        inputs["g"] = F.logsigmoid(torch.randn(gate_shape, generator=gen) + 1.0)
    else:
        inputs["g"] = min_log_decay * torch.rand(gate_shape, generator=gen)
    if initial_state:
        inputs["initial_state"] = torch.randn(B, H, K, V, generator=gen)
    return {name: t.to(DEVICE) for name, t in inputs.items()}


def gla(chunk_size: int):
    """``fn(q, k, v, g, initial_state, output_final_state, backend)`` for ``assert_matches``:
    ``recurrent`` is the oracle, ``triton`` runs the kernels with chunks of ``chunk_size``."""
    def fn(q, k, v, g, initial_state=None, output_final_state=False, backend="triton"):
        scale = q.shape[-1] ** -0.5
        if backend == "recurrent":
            return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
        return gla_triton(q, k, v, g, scale, initial_state, output_final_state, chunk_size=chunk_size)
    return fn


@pytest.mark.parametrize("B, T, H, K, V, per_key, initial_state, chunk_size", [
    (1, 1, 1, 16, 16, True, True, 32),      # a single step
    (2, 40, 1, 32, 16, True, True, 32),     # two chunks, the second partial; K != V
    (1, 37, 2, 24, 20, False, False, 32),   # scalar gate; K, V not powers of two; no initial state
    (1, 32, 1, 16, 32, False, True, 16),    # T a multiple of the chunk; diagonal sub-blocks only
], ids=["T1", "two-chunks", "scalar-gate-odd-dims", "whole-chunks"])
def test_matches_recurrent_fp32(B, T, H, K, V, per_key, initial_state, chunk_size):
    inputs = make_inputs(B, T, H, K, V, per_key=per_key, initial_state=initial_state)
    assert_matches(gla(chunk_size), inputs, backend="triton", tol=FP32_TOL)


def test_public_op_with_default_chunks():
    """``gated_linear_attention(backend='triton')``: T = 70 spans a full chunk of 64 (every
    pair of its four sub-blocks) and a partial one."""
    inputs = make_inputs(1, 70, 1, 16, 16)
    assert_matches(gated_linear_attention, inputs, backend="triton", tol=FP32_TOL)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("per_key", [True, False], ids=["per-key", "scalar"])
def test_matches_recurrent_half_precision(dtype, tol, per_key):
    """Half-precision inputs (the recurrent oracle accumulates them in fp32); the gate stays fp32
    and the state is fp32, as models keep them."""
    inputs = make_inputs(1, 45, 2, 32, 32, per_key=per_key, dtype=dtype)
    assert_matches(gla(32), inputs, backend="triton", tol=tol)


@pytest.mark.parametrize("min_log_decay", [-5.0, -20.0])
@pytest.mark.parametrize("per_key", [True, False], ids=["per-key", "scalar"])
def test_strong_decays_stay_finite_and_exact(min_log_decay, per_key):
    """Log decays down to -20 per step: a chunk's decay reaches e^-600, so any exponent taken
    the wrong way round overflows. A non-finite value anywhere fails the comparison (its
    relative error is not <= tol)."""
    inputs = make_inputs(1, 45, 1, 16, 16, per_key=per_key, min_log_decay=min_log_decay)
    assert_matches(gla(32), inputs, backend="triton", tol=STRONG_DECAY_TOL)


def test_cutting_the_sequence_and_carrying_the_state():
    """Two calls with the state carried across an arbitrary cut give the whole-sequence
    outputs, final state and gradients (through the carried state too)."""
    cut = 19

    def fn(q, k, v, g, initial_state, output_final_state, backend):
        run = gla(32)
        if backend == "whole":
            return run(q, k, v, g, initial_state, output_final_state)
        o_head, state = run(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], initial_state, True)
        o_tail, state = run(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], state, output_final_state)
        return torch.cat([o_head, o_tail], dim=1), state

    inputs = make_inputs(1, 45, 1, 16, 16)
    assert_matches(fn, inputs, backend="split", tol=FP32_TOL, reference="whole")


@pytest.mark.parametrize("used", ["output", "final_state"])
def test_gradients_when_only_one_result_is_used(used):
    """Backward with no gradient for the final state (not asked for) or for the output."""
    inputs = make_inputs(1, 20, 1, 16, 16)
    grads = {}
    for backend in ("recurrent", "triton"):
        leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        o, state = gla(16)(**leaves, output_final_state=used == "final_state", backend=backend)
        assert (state is None) == (used == "output")
        (o.sum() if used == "output" else state.sum()).backward()
        grads[backend] = {name: t.grad for name, t in leaves.items()}
    for name, got in grads["triton"].items():
        ref = grads["recurrent"][name]
        ref = torch.zeros_like(got) if ref is None else ref   # q gets none from the state alone
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("change, message", [
    (lambda x: {**x, "q": x["q"].double(), "k": x["k"].double(), "v": x["v"].double()}, "dtype"),
    (lambda x: {**x, "v": x["v"].half()}, "dtype"),
    (lambda x: {**x, "q": x["q"].new_zeros(1, 3, 1, 300), "k": x["k"].new_zeros(1, 3, 1, 300),
                "g": x["g"].new_zeros(1, 3, 1, 300), "initial_state": None}, "at most 256"),
])
def test_unsupported_inputs_raise_one_line(change, message):
    inputs = change(make_inputs(1, 3, 1, 16, 16))
    with pytest.raises(InputError, match=message):
        gla_triton(**inputs, scale=0.25)
    with pytest.raises(InputError, match="chunk_size"):
        gla_triton(**make_inputs(1, 3, 1, 16, 16), scale=0.25, chunk_size=48)
