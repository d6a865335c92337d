"""GPU check of the Triton delta rule: correctness against `recurrent` (and `chunk`), then
forward and forward+backward timings (torch.cuda.Event, median of 10 after 3 warm-ups).
Run on a CUDA machine:  TRITON_INTERPRET=0 python gpu_check_delta_rule.py
Smoke run on a CPU:     TRITON_INTERPRET=1 SMOKE=1 python gpu_check_delta_rule.py"""
import os
import statistics
import time

import torch
import torch.nn.functional as F

from seqapps.kernels.delta_rule import delta_rule

SMOKE = os.environ.get("SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"


def rel_rms(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make(b, t, h, dk, dv, dtype, gated=True, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    q, k, v = r(b, t, h, dk), F.normalize(r(b, t, h, dk), dim=-1), r(b, t, h, dv)
    beta = 2 * torch.rand(b, t, h, generator=gen, device=DEV)
    g = F.logsigmoid(r(b, t, h) + 3.0) if gated else None  # decays ~0.95 per step, some far lower
    h0 = r(b, h, dk, dv)
    leaves = [x.to(dtype) for x in (q, k, v, beta)] + [None if g is None else g.to(dtype), h0]
    return [None if x is None else x.requires_grad_() for x in leaves]


def fwd_bwd(backend, leaves):
    for x in leaves:
        if x is not None:
            x.grad = None
    q, k, v, beta, g, h0 = leaves
    o, s = delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, backend=backend)
    gen = torch.Generator(device=DEV).manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, device=DEV).to(o.dtype)
    w_s = torch.randn(s.shape, generator=gen, device=DEV)
    ((o.float() * w_o).sum() + (s * w_s).sum()).backward()
    out = {"o": o.detach().clone(), "state": s.detach().clone()}
    for name, x in zip(["q", "k", "v", "beta", "g", "h0"], leaves):
        if x is not None:
            out["d" + name] = x.grad.clone()
    return out


def check(shape, dtype, tol, gated):
    leaves = make(*shape, dtype, gated)
    ref = fwd_bwd("recurrent", leaves)
    for backend in ("triton", "chunk"):
        try:
            got = fwd_bwd(backend, leaves)
        except ImportError as err:  # the chunk module may not be there yet
            print(f"  {backend}: skipped ({err})")
            continue
        errs = {k: rel_rms(got[k], ref[k]) for k in ref}
        worst = max(errs.values())
        print(f"  {backend:7s} {str(dtype):15s} gated={gated} {shape}: worst rel RMS {worst:.2e} "
              f"{'OK' if worst <= tol else 'FAIL'}  " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()))


def timed(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench(shape, dtype, gated):
    leaves = make(*shape, dtype, gated)
    q, k, v, beta, g, h0 = leaves
    runs = {}
    for backend in ("triton", "chunk"):
        def fwd(backend=backend):
            with torch.no_grad():
                delta_rule(q, k, v, beta, g, initial_state=h0, backend=backend)

        def fwd_bwd_(backend=backend):
            o, _ = delta_rule(q, k, v, beta, g, initial_state=h0, backend=backend)
            o.sum().backward()
        runs[backend] = (fwd, fwd_bwd_)
    try:  # the anchor, when fla-core is installed
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def fla_call():
            if g is None:
                return chunk_delta_rule(q=q, k=k, v=v, beta=beta, initial_state=h0)[0]
            return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)[0]

        def fla_fwd():
            with torch.no_grad():
                fla_call()
        runs["fla chunk"] = (fla_fwd, lambda: fla_call().sum().backward())
    except ImportError:
        pass
    for name, (fwd, fb) in runs.items():
        try:
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            f_ms, fb_ms = timed(fwd), timed(fb)
            mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
            print(f"  {name:10s} {str(dtype):15s} gated={gated} {shape}: fwd {f_ms:8.2f} ms  "
                  f"fwd+bwd {fb_ms:8.2f} ms  peak {mem:.2f} GiB")
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"  {name}: failed ({type(err).__name__}: {err})")


if __name__ == "__main__":
    print("device:", torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)")
    print("correctness vs recurrent (rel RMS; fp32 tol 1e-4, bf16 tol 2e-2):")
    check_shape = (1, 9, 2, 8, 40) if SMOKE else (2, 300, 4, 64, 96)  # T not a multiple of 64; 3 value blocks
    for gated in (True, False):
        check(check_shape, torch.float32, 1e-4, gated)
    check(check_shape, torch.bfloat16, 2e-2, True)
    print("timings (median of 10):")
    bench_shapes = [(1, 16, 1, 8, 8)] if SMOKE else [(2, 4096, 4, 64, 64), (4, 4096, 8, 128, 128)]
    for shape in bench_shapes:
        for gated in (True, False):
            bench(shape, torch.bfloat16, gated)
