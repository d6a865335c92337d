"""The delta rule's ``chunk`` backend (WY / UT transform) against the ``recurrent`` oracle.

Outputs, final states and the gradients of every input (``initial_state`` included) are
compared by relative RMS error; shapes cover T = 1, a tail chunk, H = 1 and K ≠ V, with and
without the gate, β in [0, 1] and in [0, 2] (negative eigenvalues), float32 and bfloat16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import assert_matches, rel_rms, run_with_grads

from seqapps.errors import InputError
from seqapps.kernels import delta_rule
from seqapps.kernels.delta_rule import delta_rule_recurrent
from seqapps.kernels.delta_rule_chunk import unit_lower_inverse

FLOAT32_TOL = 1e-5
# bf16 inputs, float32 accumulation in both backends: what differs is the rounding of the bf16
# output and gradients (about 2^-9 relative); the float32 final states agree to ~1e-7.
BFLOAT16_TOL = 1e-2


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, gated: bool, beta_max: float = 1.0,
                dtype: torch.dtype = torch.float32, with_state: bool = True, seed: int = 0,
                log_decay_range: tuple[float, float] = (-1.0, -0.01)) -> dict:
    """Random inputs of the public op: unit keys, β uniform in [0, beta_max], log decays
    log-uniform in ``log_decay_range`` (both negative)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen)
    beta = torch.rand(b, t, h, generator=gen) * beta_max
    low, high = (math.log(-x) for x in log_decay_range)
    g = -torch.exp(torch.rand(b, t, h, generator=gen) * (high - low) + low) if gated else None
    state = torch.randn(b, h, dk, dv, generator=gen) if with_state else None
    inputs = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "initial_state": state}
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


SHAPES = {  # (B, T, H, K, V)
    "T=1": (2, 1, 2, 8, 8),
    "H=1, K>V, tail chunk": (1, 37, 1, 16, 8),
    "K<V, tail chunk": (2, 50, 3, 8, 12),
    "whole chunks": (1, 64, 2, 16, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta<=1", "beta<=2"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_chunk_matches_recurrent(shape, gated, beta_max, dtype):
    inputs = make_inputs(*shape, gated=gated, beta_max=beta_max, dtype=dtype)
    tol = FLOAT32_TOL if dtype == torch.float32 else BFLOAT16_TOL
    assert_matches(lambda **kw: delta_rule(**kw, chunk_size=16), inputs, "chunk", tol)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_chunk_matches_recurrent_default_chunk_without_state(gated):
    """The default chunk of 64 over two chunks and a tail, starting from the zero state."""
    inputs = make_inputs(1, 150, 2, 16, 16, gated=gated, beta_max=2.0, with_state=False, seed=1)
    assert_matches(delta_rule, inputs, "chunk", FLOAT32_TOL)


def test_dtypes_and_optional_state():
    inputs = make_inputs(1, 20, 2, 8, 8, gated=True, dtype=torch.bfloat16)
    o, state = delta_rule(**inputs, backend="chunk", chunk_size=8)
    assert o.dtype == torch.bfloat16 and o.shape == (1, 20, 2, 8)
    assert state is None
    _, state = delta_rule(**inputs, backend="chunk", chunk_size=8, output_final_state=True)
    assert state.dtype == torch.float32 and state.shape == (1, 2, 8, 8)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_cutting_the_sequence_anywhere_and_carrying_the_state(gated):
    """Pieces of length 1, 16, 15 and 13 (chunk 16) with the state carried give the
    whole-sequence output, final state and gradients."""
    inputs = make_inputs(2, 45, 2, 8, 12, gated=gated, beta_max=2.0, seed=2)
    cuts = [0, 1, 17, 32, 45]

    def in_pieces(q, k, v, beta, g, initial_state, output_final_state):
        state, outputs = initial_state, []
        for start, stop in zip(cuts[:-1], cuts[1:]):
            piece = slice(start, stop)
            o, state = delta_rule(q[:, piece], k[:, piece], v[:, piece], beta[:, piece],
                                  None if g is None else g[:, piece], initial_state=state,
                                  output_final_state=True, backend="chunk", chunk_size=16)
            outputs.append(o)
        return torch.cat(outputs, dim=1), state

    whole = run_with_grads(lambda **kw: delta_rule(**kw, backend="chunk", chunk_size=16), inputs)
    pieces = run_with_grads(in_pieces, inputs)
    errors = {name: rel_rms(pieces[name], whole[name]) for name in whole}
    assert max(errors.values()) < FLOAT32_TOL, errors


@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta<=1", "beta<=2"])
def test_extreme_gates_over_a_long_sequence(beta_max):
    """Log decays from -1e-4 to -20 per step over T = 8192 with the default chunk of 64 (so
    up to -1280 accumulated inside a chunk): everything finite, the forward pass equal to the
    float64 recurrence over the whole sequence, gradients equal to it on a 256-token slice."""
    inputs = make_inputs(1, 8192, 2, 16, 16, gated=True, beta_max=beta_max, seed=3,
                         log_decay_range=(-20.0, -1e-4))
    got = run_with_grads(lambda **kw: delta_rule(**kw, backend="chunk"), inputs)
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"

    as_float64 = {name: None if x is None else x.double() for name, x in inputs.items()}
    with torch.no_grad():
        ref_o, ref_state = delta_rule_recurrent(**as_float64, output_final_state=True)
    assert rel_rms(got["output"], ref_o) < FLOAT32_TOL
    assert rel_rms(got["final_state"], ref_state) < FLOAT32_TOL

    head = {name: x if name == "initial_state" else x[:, :256] for name, x in inputs.items()}
    got_head = run_with_grads(lambda **kw: delta_rule(**kw, backend="chunk"), head)
    ref_head = run_with_grads(lambda **kw: delta_rule_recurrent(**kw),
                              {name: x.double() for name, x in head.items()})
    errors = {name: rel_rms(got_head[name], ref_head[name]) for name in ref_head}
    assert max(errors.values()) < FLOAT32_TOL, errors


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gradcheck_float64(gated):
    """A chunk of 4 and a tail of 3, β across [0, 2], every input differentiated."""
    inputs = make_inputs(1, 7, 2, 3, 2, gated=gated, beta_max=2.0, dtype=torch.float64, seed=4)
    names = [name for name, x in inputs.items() if x is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return delta_rule(**kw, output_final_state=True, backend="chunk", chunk_size=4)

    leaves = tuple(inputs[name].clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(fn, leaves)


class _DeltaRule(torch.nn.Module):
    def forward(self, q, k, v, beta, g, initial_state, output_final_state=True):
        return delta_rule(q, k, v, beta, g, initial_state=initial_state,
                          output_final_state=output_final_state, backend="chunk", chunk_size=8)


def test_torch_export():
    inputs = make_inputs(1, 20, 2, 8, 8, gated=True, beta_max=2.0, seed=5)
    args = tuple(inputs.values())
    exported = torch.export.export(_DeltaRule(), args)
    for got, want in zip(exported.module()(*args), _DeltaRule()(*args)):
        assert rel_rms(got, want) < FLOAT32_TOL


@pytest.mark.slow
def test_torch_compile_forward_and_backward():
    """Inductor compiles the chunked form (tens of seconds on a busy 2-core machine)."""
    inputs = make_inputs(1, 20, 2, 8, 8, gated=True, beta_max=2.0, seed=6)
    compiled = torch.compile(_DeltaRule())
    got = run_with_grads(compiled, inputs)
    want = run_with_grads(_DeltaRule(), inputs)
    errors = {name: rel_rms(got[name], want[name]) for name in want}
    assert max(errors.values()) < FLOAT32_TOL, errors


class _PlainDeltaRule(torch.nn.Module):
    def forward(self, q, k, v, beta, initial_state):
        return delta_rule(q, k, v, beta, initial_state=initial_state, output_final_state=True,
                          backend="chunk", chunk_size=8)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_onnx_export_of_the_chunk_form(gated, tmp_path):
    """The chunk form is what exported models run: ``torch.onnx.export`` with a dynamic batch,
    then onnxruntime on a batch of another size against PyTorch (three chunks and a tail)."""
    pytest.importorskip("onnxruntime")
    from seqapps.export import export_onnx

    inputs = make_inputs(2, 30, 2, 8, 4, gated=gated, beta_max=2.0, seed=7)
    if gated:
        model, names = _DeltaRule(), ["q", "k", "v", "beta", "g", "initial_state"]
    else:
        model, names = _PlainDeltaRule(), ["q", "k", "v", "beta", "initial_state"]
    args = tuple(inputs[name] for name in names)
    diff = export_onnx(model, args, tmp_path / "delta_rule.onnx", names, ["o", "final_state"])
    assert diff < 1e-4


@pytest.mark.parametrize("size", [1, 2, 16, 64])
def test_unit_lower_inverse_is_exact(size):
    """The doubling inverse of ``I + A`` (``A`` strictly lower, entries as large as the UT
    transform's with β up to 2) against a triangular solve, in float64."""
    gen = torch.Generator().manual_seed(size)
    strict = torch.tril(2 * torch.rand(3, 2, size, size, generator=gen, dtype=torch.float64) - 1, -1)
    identity = torch.eye(size, dtype=torch.float64).expand_as(strict)
    want = torch.linalg.solve_triangular(identity + strict, identity, upper=False, unitriangular=True)
    got = unit_lower_inverse(strict)
    assert rel_rms(got, want) < 1e-12
    assert torch.equal(got.triu(1), torch.zeros_like(got))


def _bad(**changes) -> dict:
    inputs = make_inputs(1, 6, 2, 4, 4, gated=True)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("inputs, options", [
    (_bad(k=torch.randn(1, 6, 2, 5)), {}),
    (_bad(v=torch.randn(2, 6, 2, 4)), {}),
    (_bad(beta=torch.rand(1, 6)), {}),
    (_bad(g=-torch.rand(1, 6, 2, 4)), {}),
    (_bad(initial_state=torch.randn(1, 2, 4, 5)), {}),
    (_bad(), {"backend": "fast"}),
    (_bad(), {"backend": "chunk", "chunk_size": 0}),
    (_bad(beta=torch.ones(1, 6, 2, dtype=torch.int32)), {}),
    (_bad(q=torch.randn(6, 2, 4)), {}),
], ids=["k", "v", "beta", "g per key", "initial_state", "backend", "chunk_size", "integer beta", "q 3-D"])
def test_bad_input_raises_one_line(inputs, options):
    with pytest.raises(InputError) as raised:
        delta_rule(**inputs, **options)
    assert "\n" not in str(raised.value)
