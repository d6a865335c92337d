"""The Triton selective scan against the ``recurrent`` oracle: outputs, final states and every
gradient, on small shapes run by the Triton interpreter on the CPU (or on a GPU when one is
there and ``TRITON_INTERPRET=0`` is set)."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_matches, rel_rms, run_with_grads, triton_test_device

DEVICE = triton_test_device()

from seqapps.kernels.selective_scan import selective_scan  # noqa: E402
from seqapps.kernels.triton.selective_scan import selective_scan_triton  # noqa: E402

FP32_TOL = 1e-5
FP64_TOL = 1e-12
BF16_TOL = 2e-2


def make_inputs(b: int, t: int, d: int, n: int, groups: int | None = None, skip: bool = True,
                gate: bool = True, bias: bool = True, softplus: bool = True,
                negative_eigenvalues: bool = False, with_initial: bool = True,
                log_decay_range: tuple[float, float] = (1e-2, 2.0), dtype: torch.dtype = torch.float32,
                seed: int = 0) -> dict:
    """Random selective-scan inputs. ``A = -exp(·)`` spans ``log_decay_range`` in magnitude
    (log-uniformly); ``delta`` is centred near 0 under softplus, and positive (around 1) as a
    raw step size, so that states neither blow up nor vanish over the test lengths."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    lo, hi = (torch.tensor(r).log() for r in log_decay_range)
    bc_shape = (b, t, n) if groups is None else (b, t, groups, n)
    inputs = {
        "u": rand(b, t, d),
        "delta": 0.5 * rand(b, t, d) if softplus else 0.5 + torch.rand(b, t, d, generator=gen),
        "A": -(lo + (hi - lo) * torch.rand(d, n, generator=gen)).exp(),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(d) if skip else None,
        "z": rand(b, t, d) if gate else None,
        "delta_bias": 0.1 * rand(d) if bias else None,
        "initial_state": rand(b, d, n) if with_initial else None,
    }
    inputs = {name: None if x is None else x.to(DEVICE, dtype) for name, x in inputs.items()}
    return {**inputs, "delta_softplus": softplus, "negative_eigenvalues": negative_eigenvalues}


def with_launch(block_d: int | None = None, checkpoint_every: int | None = None):
    """``selective_scan`` whose triton backend uses the given channel block and checkpoint
    interval, so that small shapes still cross several blocks and checkpoints."""

    def fn(*, backend, **kwargs):
        if backend != "triton":
            return selective_scan(**kwargs, backend=backend)
        return selective_scan_triton(**kwargs, block_d=block_d, checkpoint_every=checkpoint_every)

    return fn


# name: (make_inputs arguments, block_d, checkpoint_every)
FP32_CASES = {
    "one_step": (dict(b=2, t=1, d=4, n=3), None, None),
    "odd_length_all_options": (dict(b=2, t=23, d=5, n=3), None, 8),
    "plain_scan_no_options": (dict(b=1, t=9, d=4, n=4, skip=False, gate=False, bias=False, softplus=False,
                                   with_initial=False), None, 4),
    "skip_without_gate": (dict(b=1, t=11, d=3, n=2, gate=False, bias=False), None, None),
    "gate_without_skip": (dict(b=1, t=11, d=3, n=2, skip=False, softplus=False), None, 5),
    "grouped_bc_odd_group_size": (dict(b=1, t=13, d=6, n=5, groups=2), None, 6),
    "grouped_bc_several_blocks_per_group": (dict(b=1, t=10, d=8, n=4, groups=2), 2, 3),
    "several_blocks_shared_bc": (dict(b=1, t=12, d=7, n=3, gate=False), 2, 5),
    "negative_eigenvalues": (dict(b=1, t=17, d=4, n=3, negative_eigenvalues=True), None, 6),
    "negative_eigenvalues_raw_delta": (dict(b=1, t=12, d=3, n=4, negative_eigenvalues=True, softplus=False,
                                            groups=3), None, 5),
    "wide_state": (dict(b=1, t=6, d=32, n=16, groups=4), None, 4),
    "extreme_decays": (dict(b=1, t=20, d=4, n=6, softplus=False, log_decay_range=(1e-4, 20.0)), None, 7),
}


@pytest.mark.parametrize("case", FP32_CASES)
def test_matches_recurrent_fp32(case):
    """Output, final state and the gradient of every input within 1e-5 relative RMS."""
    shape, block_d, checkpoint_every = FP32_CASES[case]
    errors = assert_matches(with_launch(block_d, checkpoint_every), make_inputs(**shape), "triton", FP32_TOL)
    assert {"d_u", "d_delta", "d_A", "d_B", "d_C"} <= set(errors)


@pytest.mark.slow
def test_matches_recurrent_over_two_default_chunks():
    """T = 70 crosses the default 64-step checkpoint with a ragged last chunk."""
    inputs = make_inputs(b=1, t=70, d=6, n=5, groups=2)
    assert_matches(selective_scan, inputs, "triton", FP32_TOL)


def test_matches_recurrent_fp64():
    """In float64 the kernels accumulate in float64: agreement to rounding."""
    inputs = make_inputs(b=1, t=9, d=3, n=3, groups=3, dtype=torch.float64, negative_eigenvalues=True)
    assert_matches(with_launch(checkpoint_every=4), inputs, "triton", FP64_TOL)


def test_gradcheck_fp64():
    """Finite differences, independent of the oracle, on a tiny float64 problem (fast mode:
    one random direction per input, to keep the interpreter's launches few)."""
    inputs = make_inputs(b=1, t=3, d=2, n=2, dtype=torch.float64)
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    flags = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

    def fn(*tensors):
        y, state = selective_scan_triton(**dict(zip(names, tensors)), **flags, output_final_state=True,
                                         checkpoint_every=2)
        return y, state

    leaves = [inputs[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_matches_recurrent_bf16():
    """bfloat16 inputs, fp32 accumulation inside: within bf16 rounding of the oracle."""
    inputs = make_inputs(b=1, t=15, d=6, n=4, groups=2, dtype=torch.bfloat16)
    assert_matches(with_launch(checkpoint_every=6), inputs, "triton", BF16_TOL)


def test_fp16_inputs_run_and_match():
    inputs = make_inputs(b=1, t=8, d=4, n=3, dtype=torch.float16)
    assert_matches(selective_scan, inputs, "triton", BF16_TOL)


@pytest.mark.parametrize("cut", [1, 7, 12])
def test_state_carry_equals_whole_sequence(cut):
    """Scanning ``[:cut]`` then ``[cut:]`` from the carried state gives the whole-sequence
    output and final state (forward only: the path that saves no checkpoints)."""
    inputs = make_inputs(b=2, t=13, d=4, n=3, groups=2)
    per_time = ("u", "delta", "z", "B", "C")
    with torch.no_grad():
        whole, whole_state = selective_scan(**inputs, output_final_state=True, backend="triton")
        head = {k: v[:, :cut] if k in per_time else v for k, v in inputs.items()}
        tail = {k: v[:, cut:] if k in per_time else v for k, v in inputs.items()}
        y_head, state = selective_scan(**head, output_final_state=True, backend="triton")
        y_tail, final = selective_scan(**{**tail, "initial_state": state}, output_final_state=True,
                                       backend="triton")
        ref, ref_state = selective_scan(**inputs, output_final_state=True, backend="recurrent")
    assert rel_rms(torch.cat([y_head, y_tail], 1), whole) < FP32_TOL
    assert rel_rms(final, whole_state) < FP32_TOL
    assert rel_rms(whole, ref) < FP32_TOL and rel_rms(whole_state, ref_state) < FP32_TOL


@pytest.mark.parametrize("loss_on", ["output", "state"])
def test_gradients_through_one_result_only(loss_on):
    """A loss on the output alone (no final state asked for: ``None`` comes back) or on the
    final state alone: the backward handles the missing incoming gradient."""
    inputs = make_inputs(b=1, t=10, d=4, n=3)
    grads = {}
    for backend in ("recurrent", "triton"):
        leaves = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
        y, state = selective_scan(**leaves, output_final_state=loss_on == "state", backend=backend)
        if loss_on == "output":
            assert state is None
            loss = (y * torch.linspace(-1, 1, y.numel()).to(y).view_as(y)).sum()
        else:
            loss = (state * torch.linspace(-1, 1, state.numel()).to(state).view_as(state)).sum()
        loss.backward()
        grads[backend] = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    for name, ref in grads["recurrent"].items():
        got = grads["triton"][name]
        if ref is None:  # no path from this input to the loss (z, D with a loss on the state)
            assert got is None or not got.any(), name
        else:
            assert rel_rms(got, ref) < FP32_TOL, name


def test_dtypes_and_shapes_of_results():
    """``y`` in the input dtype; the state in the accumulation dtype (as the oracle); each
    gradient in its input's dtype and shape; ungrouped ``B`` keeps its ``[B, T, N]`` shape."""
    inputs = make_inputs(b=1, t=4, d=3, n=2, dtype=torch.bfloat16)
    result = run_with_grads(lambda **kw: selective_scan(**kw, backend="triton"), inputs)
    assert result["output"].dtype == torch.bfloat16
    assert result["final_state"].dtype == torch.float32
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor):
            assert result[f"d_{name}"].shape == x.shape and result[f"d_{name}"].dtype == x.dtype, name
