"""GPU check of backend='triton' for gated_linear_attention (run from the repo root on a CUDA machine).

1. correctness at B=4, H=8, T=4096, K=V=128: bf16 triton vs the fp32 chunk backend fed the same
   (bf16-rounded) inputs, outputs + final state + every gradient, as relative RMS; and fp32 triton
   vs recurrent on a short slice (tight);
2. timing, forward and forward+backward, median of 20 after warm-up, torch.cuda.Event; next to
   fla's chunk_gla when fla is installed.

``PARTS`` (environment, comma-separated, default all): ``check`` (1), ``ours`` (2, this repo's
kernels at 4 and 8 warps), ``fla`` (2, fla's, whose first calls autotune for minutes: give it its
own time limit).
"""
import os
import statistics

import torch
import torch.nn.functional as F

import seqapps.kernels.triton.gla as gla_kernels
from seqapps.kernels.gla import gated_linear_attention

assert os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
torch.manual_seed(0)
dev = "cuda"
PARTS = set(os.environ.get("PARTS", "check,ours,fla").split(","))
B, H, T, K, V = 4, 8, 4096, 128, 128


def rel_rms(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make(dtype, T=T, per_key=True):
    q = torch.randn(B, T, H, K, device=dev).to(dtype)
    k = (torch.randn(B, T, H, K, device=dev) / K ** 0.5).to(dtype)   # fla-like key scale
    v = torch.randn(B, T, H, V, device=dev).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K if per_key else 1, device=dev) + 3).squeeze(-1) / 16
    h0 = torch.randn(B, H, K, V, device=dev)
    return [q, k, v, g, h0]


def run(fn, tensors, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o, s = fn(*leaves)
    gen = torch.Generator(device=dev).manual_seed(seed)
    ((o * torch.randn(o.shape, device=dev, generator=gen).to(o.dtype)).sum()
     + (s * torch.randn(s.shape, device=dev, generator=gen)).sum()).backward()
    return [o, s] + [t.grad for t in leaves]


names = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]
ops = {b: (lambda q, k, v, g, h0, b=b: gated_linear_attention(q, k, v, g, initial_state=h0,
                                                             output_final_state=True, backend=b))
       for b in ("triton", "chunk", "recurrent")}

for per_key in ((True, False) if "check" in PARTS else ()):
    x = make(torch.bfloat16, per_key=per_key)
    got = run(ops["triton"], x)
    ref = run(ops["chunk"], [t.float() for t in x])
    print(f"bf16 triton vs fp32 chunk, T={T}, per_key={per_key}:",
          {n: f"{rel_rms(a, b):.1e}" for n, a, b in zip(names, got, ref)})
    assert all(torch.isfinite(t).all() for t in got)
    x = make(torch.float32, T=256, per_key=per_key)
    got, ref = run(ops["triton"], x), run(ops["recurrent"], x)
    print(f"fp32 triton vs recurrent, T=256, per_key={per_key}:",
          {n: f"{rel_rms(a, b):.1e}" for n, a, b in zip(names, got, ref)})


def timed(fn, backward, reps=20):
    def once():
        leaves = [t.detach().requires_grad_(backward) for t in x]
        o, s = fn(*leaves)
        if backward:
            o.backward(do)
    for _ in range(3):
        once()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


x = make(torch.bfloat16)[:4]
do = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)


def ours(q, k, v, g):
    return gated_linear_attention(q, k, v, g, backend="triton", output_final_state=True)


def report(name, fn):
    torch.cuda.reset_peak_memory_stats()
    fwd, fwd_bwd = timed(fn, False), timed(fn, True)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"{name}: B={B} H={H} T={T} K=V={K} bf16: forward {fwd:.3f} ms, forward+backward {fwd_bwd:.3f} ms, "
          f"peak {peak:.2f} GiB", flush=True)
    return fwd, fwd_bwd


mine = report(f"seqapps triton ({gla_kernels.NUM_WARPS} warps)", ours)
if "ours" in PARTS:
    default_warps = gla_kernels.NUM_WARPS
    gla_kernels.NUM_WARPS = 8 if default_warps != 8 else 4   # the launch option: another compiled variant
    report(f"seqapps triton ({gla_kernels.NUM_WARPS} warps)", ours)
    gla_kernels.NUM_WARPS = default_warps
if "fla" in PARTS:
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        print("fla not installed: no anchor")
    else:   # fla autotunes its kernels on the first calls (minutes): the warm-up in timed() takes it
        theirs = report("fla chunk_gla", lambda q, k, v, g: chunk_gla(q, k, v, g, scale=K ** -0.5,
                                                                      output_final_state=True))
        print(f"seqapps speed as a share of fla's: forward {theirs[0] / mine[0]:.2f}x, "
              f"forward+backward {theirs[1] / mine[1]:.2f}x (target >= 0.8x)")
