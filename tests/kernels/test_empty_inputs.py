"""Every op and backend over nothing: no time steps (an empty piece of a stream), an empty batch or
no heads (no variates for the 2-D scan) give an empty output and the state unchanged, with the
gradient of the final state reaching the initial state whole; a state with a zero dimension is
refused in one line. (The fused C kernel crashed the process on an empty batch before the ops
caught these cases.)"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from seqapps.errors import InputError
from seqapps.kernels import delta_rule, gated_linear_attention, scan2d, selective_scan
from seqapps.kernels.gla_cpu import available as cpu_kernel_available
from seqapps.kernels.gla_cpu import gla_cpu

MARKS = {  # the backends that cannot run everywhere
    "cpu": pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler: the fused CPU kernel is not built"),
    "triton": pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
        reason="triton on CPU tensors needs the triton package and TRITON_INTERPRET=1"),
}
EMPTY = {"no steps": (2, 0, 3), "empty batch": (0, 5, 3), "no heads": (2, 5, 0)}  # (B, T, H or variates)
K, V, N = 4, 6, 5


def gla_case(b, t, h, backend):
    q, k = torch.randn(b, t, h, K), torch.randn(b, t, h, K)
    inputs = dict(q=q, k=k, v=torch.randn(b, t, h, V), g=-torch.rand(b, t, h, K))
    return lambda **kw: gated_linear_attention(**inputs, **kw, backend=backend), (b, t, h, V), (b, h, K, V)


def delta_rule_case(b, t, h, backend):
    inputs = dict(q=torch.randn(b, t, h, K), k=torch.randn(b, t, h, K), v=torch.randn(b, t, h, V),
                  beta=torch.rand(b, t, h), g=-torch.rand(b, t, h))
    return lambda **kw: delta_rule(**inputs, **kw, backend=backend), (b, t, h, V), (b, h, K, V)


def selective_scan_case(b, t, h, backend):
    d = 2 * h  # channels
    inputs = dict(u=torch.randn(b, t, d), delta=torch.rand(b, t, d), A=-torch.rand(d, N), B=torch.randn(b, t, N),
                  C=torch.randn(b, t, N), D=torch.randn(d), z=torch.randn(b, t, d))
    return lambda **kw: selective_scan(**inputs, **kw, backend=backend), (b, t, d), (b, d, N)


def scan2d_case(b, t, v, backend):
    """The 2-D scan over a grid of ``v`` variates by ``t`` steps."""
    d = 3
    grid, coupling = (b, v, t, d), -torch.rand(d, N)
    inputs = dict(x=torch.randn(grid), delta_time=torch.rand(grid), delta_variate=torch.rand(grid),
                  A_time=coupling, A_variate=coupling, A_time_from_variate=coupling, A_variate_from_time=coupling,
                  **{name: torch.randn(b, v, t, N) for name in ("B_time", "B_variate", "C_time", "C_variate")})
    return lambda **kw: scan2d(**inputs, **kw, backend=backend), grid, (b, v, 2, d, N)


CASES = [pytest.param(case, backend, id=f"{op}-{backend}", marks=MARKS.get(backend, ()))
         for op, case, backends in (("gla", gla_case, ("recurrent", "chunk", "cpu", "triton")),
                                    ("delta_rule", delta_rule_case, ("recurrent", "chunk", "triton")),
                                    ("selective_scan", selective_scan_case, ("recurrent", "chunk", "triton")),
                                    ("scan2d", scan2d_case, ("recurrent", "chunk")))
         for backend in backends]


@pytest.mark.parametrize("empty", EMPTY.values(), ids=EMPTY.keys())
@pytest.mark.parametrize("case, backend", CASES)
def test_nothing_to_scan_leaves_the_state_unchanged(case, backend, empty):
    op, out_shape, state_shape = case(*empty, backend)
    initial = torch.randn(state_shape, dtype=torch.float64).float().requires_grad_()
    out, final = op(initial_state=initial, output_final_state=True)
    assert out.shape == out_shape and out.dtype == torch.float32
    assert final.shape == state_shape and final.dtype == torch.float32
    assert torch.equal(final, initial)
    if initial.numel():
        assert final.data_ptr() != initial.data_ptr()  # a copy, not the caller's tensor
    weights = torch.randn(state_shape)
    (final * weights).sum().backward()
    assert torch.equal(initial.grad, weights)
    out, final = op(output_final_state=True)  # no initial state: zeros
    assert final.shape == state_shape and not final.any()
    assert op()[1] is None


def test_a_state_with_a_zero_dimension_is_refused():
    q = torch.randn(1, 3, 2, 0)
    with pytest.raises(InputError, match="K=0"):
        gated_linear_attention(q, q, torch.randn(1, 3, 2, 4), -torch.rand(1, 3, 2, 0))
    with pytest.raises(InputError, match="V=0"):
        delta_rule(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 0), torch.rand(1, 3, 2))
    u = torch.randn(1, 3, 4)
    with pytest.raises(InputError, match="N=0"):
        selective_scan(u, u, torch.zeros(4, 0), torch.zeros(1, 3, 0), torch.zeros(1, 3, 0))
    with pytest.raises(InputError, match="0 groups"):
        selective_scan(u, u, torch.zeros(4, 3), torch.zeros(1, 3, 0, 3), torch.zeros(1, 3, 0, 3))


@pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler: the fused CPU kernel is not built")
@pytest.mark.parametrize("b, h", [(0, 2), (2, 0)], ids=["empty batch", "no heads"])
def test_fused_cpu_kernel_called_directly_on_no_sequences(b, h):
    q = torch.randn(b, 5, h, K, requires_grad=True)
    out, final = gla_cpu(q, q, torch.randn(b, 5, h, V), -torch.rand(b, 5, h, K), 0.5, None, True, 64)
    assert out.shape == (b, 5, h, V) and final.shape == (b, h, K, V)
    out.sum().backward()
    assert q.grad.shape == q.shape
