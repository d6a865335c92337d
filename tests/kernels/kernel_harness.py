"""Comparing a kernel backend with the ``recurrent`` oracle: outputs, final states and the
gradients of every input (``initial_state`` included), by relative RMS error as fla does."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``rms(got - ref) / rms(ref)`` in float64 (0 when both are zero)."""
    got, ref = got.double(), ref.double()
    denom = ref.pow(2).mean().sqrt().item()
    err = (got - ref).pow(2).mean().sqrt().item()
    return err / denom if denom > 0 else err


def run_with_grads(fn: Callable, inputs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Call ``fn(**inputs, output_final_state=True)``; backprop a fixed random projection of
    output and final state; return output, state and every input's gradient."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    out, state = fn(**leaves, output_final_state=True)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    w_state = torch.randn(state.shape, generator=g).to(state.device, state.dtype)
    ((out * w_out).sum() + (state * w_state).sum()).backward()
    result = {"output": out.detach(), "final_state": state.detach()}
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            assert v.grad is not None, f"no gradient reached {k}"
            result[f"d_{k}"] = v.grad.detach()
    return result


def assert_matches(fn: Callable, inputs: dict, backend: str, tol: float, reference: str = "recurrent") -> dict:
    """Every output and gradient of ``backend`` within ``tol`` relative RMS of ``reference``."""
    ref = run_with_grads(lambda **kw: fn(**kw, backend=reference), inputs)
    got = run_with_grads(lambda **kw: fn(**kw, backend=backend), inputs)
    errors = {k: rel_rms(got[k], ref[k]) for k in ref}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"{backend} vs {reference}: relative RMS errors above {tol}: {bad}"
    return errors


def triton_test_device() -> str:
    """Where a Triton test module runs, called at its import: ``"cuda"`` (the compiled kernels)
    on a GPU with ``TRITON_INTERPRET=0``, else ``"cpu"`` under the interpreter (tests/conftest.py
    sets ``TRITON_INTERPRET=1`` when there is no GPU driver). Skips the module where Triton is not
    installed (torch's macOS and Windows wheels) or can run neither way."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interpreted:
        return "cuda"
    if not interpreted:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                    allow_module_level=True)
    return "cpu"
