"""GPU check of the Triton selective scan: correctness against recurrent (and chunk), then
forward and forward+backward timings with CUDA events. Run from the repo root on a GPU:
    python gpu_check_selective_scan.py
(SMOKE=1 runs tiny shapes on the CPU under the Triton interpreter, to check the script.)"""
import os

SMOKE = os.environ.get("SMOKE") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
import torch
from seqapps.kernels.selective_scan import selective_scan
from seqapps.kernels.triton.selective_scan import selective_scan_triton

dev = "cpu" if SMOKE else "cuda"
torch.manual_seed(0)


def inputs(b, t, d, n, groups=None, dtype=torch.bfloat16):
    bc = (b, t, n) if groups is None else (b, t, groups, n)
    x = dict(u=torch.randn(b, t, d), delta=0.5 * torch.randn(b, t, d), A=-torch.rand(d, n).mul(4).add(0.1),
             B=torch.randn(*bc), C=torch.randn(*bc), D=torch.randn(d), z=torch.randn(b, t, d),
             delta_bias=0.1 * torch.randn(d), initial_state=torch.randn(b, d, n))
    return {k: v.to(dev, dtype if k not in ("A", "D", "delta_bias") else torch.float32).requires_grad_()
            for k, v in x.items()}


def run(x, backend, **kw):
    fn = selective_scan_triton if backend == "triton" else selective_scan
    extra = kw if backend == "triton" else {"backend": backend}
    y, s = fn(**x, delta_softplus=True, output_final_state=True, **extra)
    return y, s


def grads(x, backend, **kw):
    for v in x.values():
        v.grad = None
    y, s = run(x, backend, **kw)
    g = torch.Generator(device=dev).manual_seed(1)
    ((y * torch.randn(y.shape, generator=g, device=dev, dtype=y.dtype)).sum()
     + (s * torch.randn(s.shape, generator=g, device=dev, dtype=s.dtype)).sum()).backward()
    return {"y": y.detach().float(), "state": s.detach().float(), **{k: v.grad.float() for k, v in x.items()}}


def rel(a, b):
    return ((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


shape = (1, 37, 8, 4) if SMOKE else (2, 1000, 256, 16)
for dtype in (torch.float32, torch.bfloat16):
    for groups in (None, 4):
        x = inputs(*shape, groups=groups, dtype=dtype)
        ref = grads(x, "recurrent")
        for backend in ("triton", "chunk"):
            try:
                got = grads(x, backend)
            except Exception as e:  # the chunk backend may not be there yet
                print(f"{backend}: {type(e).__name__}: {e}")
                continue
            errs = {k: rel(got[k], ref[k]) for k in ref}
            worst = max(errs, key=errs.get)
            print(f"{str(dtype):15s} groups={groups} {backend:7s} worst rel RMS {errs[worst]:.1e} ({worst})")


def time_ms(fn, reps=10):
    for _ in range(2):
        fn()
    if SMOKE:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


bench = (1, 64, 8, 4) if SMOKE else (8, 4096, 1536, 16)  # Mamba-130M-like block: d_inner 1536, d_state 16
x = inputs(*bench, dtype=torch.bfloat16)
print(f"timing B, T, D, N = {bench}, bf16, softplus, D skip, z gate")
for backend, kw in [("triton", {"block_d": bd}) for bd in (4, 8, 16, 32)] + [("chunk", {})]:
    try:
        with torch.no_grad():
            fwd = time_ms(lambda: run(x, backend, **kw))
        fwd_bwd = time_ms(lambda: grads(x, backend, **kw))
        print(f"{backend:7s} {kw}: forward {fwd:.2f} ms, forward+backward {fwd_bwd:.2f} ms")
    except Exception as e:
        print(f"{backend} {kw}: {type(e).__name__}: {e}")
try:  # the reference CUDA kernel, when installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    args = [x["u"].transpose(1, 2).contiguous(), x["delta"].transpose(1, 2).contiguous(), x["A"],
            x["B"].transpose(1, 2).contiguous(), x["C"].transpose(1, 2).contiguous(), x["D"],
            x["z"].transpose(1, 2).contiguous(), x["delta_bias"], True]
    print(f"mamba_ssm: forward+backward {time_ms(lambda: selective_scan_fn(*args).float().sum().backward()):.2f} ms")
except ImportError:
    print("mamba_ssm not installed")
