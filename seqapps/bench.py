"""``seqapps bench``: speed and memory of the kernels' backends, beside the anchors a user
would otherwise pick — causal softmax attention (``scaled_dot_product_attention``), a plain
matmul (the machine's practical FLOP/s ceiling), ``mambapy``'s Mamba block and, on a GPU,
``fla-core``'s ``chunk_gla`` when installed.

Each case is timed as the median of ``repeats`` runs after ``warmup`` runs, forward alone
(``fwd``) and forward + backward (``fwd_bwd``). Peak memory is the growth of the process's
peak resident set on CPU (reset before each case through ``/proc/self/clear_refs``) and
``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from seqapps.errors import InputError
from seqapps.kernels.backend import BACKENDS
from seqapps.kernels.gla import gla_cpu_available

OPS = ("gla", "gla_scalar", "delta_rule", "selective_scan", "sdpa", "mamba_block", "lightnet_image")
MODES = ("fwd", "fwd_bwd")
DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class Case:
    op: str
    backend: str
    T: int
    mode: str
    ms: float | None
    peak_mib: float | None
    gflops: float | None = None  # achieved, for ops with a FLOP count
    note: str = ""


# --------------------------------------------------------------------------- inputs
def _inputs(op: str, batch: int, heads: int, dim: int, T: int, device, dtype, d_state: int = 16):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    if op in ("gla", "gla_scalar"):
        gate_shape = (batch, T, heads, dim) if op == "gla" else (batch, T, heads)
        gate = F.logsigmoid(torch.randn(*gate_shape, generator=g) + 3.0).to(device, dtype).requires_grad_()
        return {"q": rnd(batch, T, heads, dim), "k": rnd(batch, T, heads, dim), "v": rnd(batch, T, heads, dim),
                "g": gate}
    if op == "delta_rule":
        k = F.normalize(torch.randn(batch, T, heads, dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
        return {"q": rnd(batch, T, heads, dim), "k": k, "v": rnd(batch, T, heads, dim),
                "beta": torch.rand(batch, T, heads, generator=g).to(device, dtype).requires_grad_()}
    if op == "selective_scan":
        channels = heads * dim
        return {"u": rnd(batch, T, channels), "delta": rnd(batch, T, channels, scale=0.5),
                "A": (-torch.rand(channels, d_state, generator=g) - 0.5).to(device, dtype).requires_grad_(),
                "B": rnd(batch, T, d_state), "C": rnd(batch, T, d_state), "delta_softplus": True}
    if op == "sdpa":
        return {"q": rnd(batch, heads, T, dim), "k": rnd(batch, heads, T, dim), "v": rnd(batch, heads, T, dim)}
    raise InputError(f"bench: unknown op '{op}'; choose from {', '.join(OPS)}")


def _op_fn(op: str, backend: str) -> Callable:
    from seqapps import kernels

    if op in ("gla", "gla_scalar"):
        return lambda **kw: kernels.gated_linear_attention(**kw, backend=backend)[0]
    if op == "delta_rule":
        return lambda **kw: kernels.delta_rule(**kw, backend=backend)[0]
    if op == "selective_scan":
        return lambda **kw: kernels.selective_scan(**kw, backend=backend)[0]
    if op == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise InputError(f"bench: no backend '{backend}' for op '{op}'")


def gla_scalar_flops(batch: int, heads: int, T: int, dim: int, chunk: int = 64) -> float:
    """Matmul FLOPs of the chunked scalar-decay GLA forward: per chunk of ``c`` and head,
    ``QKᵀ`` and ``(A∘D)V`` (2c²K + 2c²V) plus ``Q S`` and ``Kᵀ V`` (4cKV)."""
    return batch * heads * T * (2 * chunk * dim * 2 + 4 * dim * dim)


# --------------------------------------------------------------------------- timing
def _return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks in its heap, which would hide the peak of a case behind the
    pages earlier cases left resident: ``malloc_trim(0)`` hands every free page back first, so
    the growth of the peak resident set is a per-case measure. (Fixing a low mmap threshold
    instead would also do it, but turns every state-sized tensor of the recurrent loop into an
    mmap/munmap pair and slows that loop about fivefold: the allocator stays as users have it.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    _return_freed_memory_to_the_os()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_mib("VmRSS")


def _rss_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_since(device, base: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _rss_mib("VmHWM") - base


def time_case(run: Callable[[], None], device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``run`` and the peak memory growth (MiB) during the timed runs."""
    for _ in range(warmup):
        run()
    base = _reset_peak(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), _peak_since(device, base)


def _runner(fn: Callable, inputs: dict, mode: str) -> Callable[[], None]:
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def run():
        for t in tensors:
            t.grad = None
        if mode == "fwd":
            with torch.no_grad():
                fn(**inputs)
        else:
            fn(**inputs).float().sum().backward()

    return run


def matmul_gflops(device, dtype, n: int = 2048, repeats: int = 5) -> float:
    """The practical ceiling: GFLOP/s of one ``n × n`` matmul on this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_case(lambda: a @ a, device, warmup=2, repeats=repeats)
    return 2 * n**3 / (ms / 1e3) / 1e9


def lightnet_image_backbones(grid_side: int, embed_dim: int, device, dtype) -> dict:
    """LightNet's claim (Qin et al., 2024): the image backbone of the digits recipes
    (``digits_lightnet_single`` / ``digits_lightnet_4dir``: 2 blocks, width ``embed_dim``, one
    channel, 2×2 patches) over a ``grid_side × grid_side`` patch grid, with LightNet's one
    native additive scan (``native``) or as a 1-D mixer over four raster scans sharing its
    weights (``scan4``); the same parameters."""
    from seqapps.backbones.image import ImageBackbone

    common = dict(img_size=2 * grid_side, patch_size=2, in_chans=1, num_classes=10, embed_dim=embed_dim,
                  depth=2, mixer="lightnet")
    torch.manual_seed(0)
    return {"native": ImageBackbone(**common, scan="native").to(device, dtype),
            "scan4": ImageBackbone(**common, scan="raster", directions=4, shared_scan_weights=True).to(device, dtype)}


def _mamba_blocks(d_model: int, device, dtype):
    """mambapy's Mamba block and the same block with its scan replaced by seqapps' ``chunk``."""
    from mambapy.mamba import MambaBlock, MambaConfig

    from seqapps.kernels import selective_scan

    class SeqappsScanBlock(MambaBlock):
        def selective_scan(self, x, delta, A, B, C, D):  # delta: softplus already applied
            return selective_scan(x, delta, A, B, C, D, backend="chunk")[0]

    config = MambaConfig(d_model=d_model, n_layers=1, d_state=16, expand_factor=2)
    torch.manual_seed(0)
    theirs = MambaBlock(config).to(device, dtype)
    ours = SeqappsScanBlock(config).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return {"mambapy": theirs, "seqapps_chunk": ours}


# --------------------------------------------------------------------------- driver
def run_bench(ops=("gla", "gla_scalar", "delta_rule", "selective_scan", "sdpa"),
              backends=("recurrent", "chunk", "cpu"), lengths=(512, 1024, 2048, 4096, 8192, 16384),
              modes=("fwd", "fwd_bwd"), batch: int = 2, heads: int = 4, dim: int = 64,
              dtype: str = "float32", device: str = "auto", warmup: int = 1, repeats: int = 3,
              recurrent_max_len: int = 1024, mamba_d_model: int = 128, fla: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Time every (op, backend, T, mode); returns ``{"machine": ..., "cases": [...]}``. Every
    option is checked first: a bad one is one ``InputError`` before anything runs."""
    ops, backends, modes = (_choices(name, value, allowed) for name, value, allowed in
                            (("op", ops, OPS), ("backend", backends, BACKENDS), ("mode", modes, MODES)))
    lengths = _counts("lengths", lengths, minimum=1)
    for name, value, minimum in (("batch", batch, 1), ("heads", heads, 1), ("dim", dim, 1), ("warmup", warmup, 0),
                                 ("repeats", repeats, 1), ("recurrent_max_len", recurrent_max_len, 0),
                                 ("mamba_d_model", mamba_d_model, 1)):
        _counts(name, value, minimum, single=True)
    if dtype not in DTYPES:
        raise InputError(f"bench: dtype={dtype!r}; choose from {', '.join(DTYPES)}")
    dev = _device(device)
    dt = getattr(torch, dtype)
    ceiling = matmul_gflops(dev, dt)
    log(f"device {dev} ({torch.get_num_threads()} threads), {dtype}; matmul ceiling {ceiling:.1f} GFLOP/s")
    cases: list[Case] = []
    for op in ops:
        for T in lengths:
            for backend in _backends_for(op, backends, dev, fla):
                if backend == "recurrent" and T > recurrent_max_len:
                    continue
                for mode in modes:
                    case = _measure(op, backend, T, mode, batch, heads, dim, dev, dt, warmup, repeats,
                                    mamba_d_model)
                    if case.ms is not None and op == "gla_scalar" and backend != "recurrent":
                        flops = gla_scalar_flops(batch, heads, T, dim) * (1 if mode == "fwd" else 3)
                        case.gflops = flops / (case.ms / 1e3) / 1e9
                    cases.append(case)
                    log(_line(case))
    return {"machine": {"device": str(dev), "threads": torch.get_num_threads(), "dtype": dtype,
                        "matmul_gflops": ceiling, "torch": torch.__version__},
            "shape": {"batch": batch, "heads": heads, "dim": dim, "mamba_d_model": mamba_d_model},
            "cases": [asdict(c) for c in cases]}


def _choices(what: str, value, allowed: tuple[str, ...]) -> list[str]:
    """``value`` (a name or a list of names) as a list, each one of ``allowed``."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        raise InputError(f"bench: {what}s={value!r}; expected a list such as [{allowed[0]}] from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise InputError(f"bench: unknown {what} '{name}'; choose from {', '.join(allowed)}")
    return list(names)


def _counts(option: str, value, minimum: int, single: bool = False) -> list[int]:
    """``value`` (an integer, or for lists a list of them) as a list, each at least ``minimum``."""
    numbers = [value] if single or not isinstance(value, (list, tuple)) else value
    if not numbers or any(isinstance(n, bool) or not isinstance(n, int) or n < minimum for n in numbers):
        kind = "an integer" if single else "integers (a list such as [512, 4096])"
        raise InputError(f"bench: {option}={value!r}; expected {kind} of at least {minimum}")
    return list(numbers)


def _device(device: str) -> torch.device:
    """``auto`` (a CUDA GPU when there is one, else the CPU), ``cpu`` or ``cuda[:N]``, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"bench: device={device!r}; expected auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"bench: device={device!r}; expected auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"bench: device={device!r} but no CUDA GPU is visible here; use device=cpu (or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"bench: device={device!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                         "use cuda:0 .. cuda:N-1")
    return dev


def _backends_for(op: str, backends, dev, fla: bool) -> list[str]:
    if op == "sdpa":
        return ["sdpa"]
    if op == "mamba_block":
        return ["mambapy", "seqapps_chunk"]
    if op == "lightnet_image":
        return ["native", "scan4"]
    chosen = [b for b in backends if (b != "triton" or dev.type == "cuda")
              and (b != "cpu" or (dev.type == "cpu" and op in ("gla", "gla_scalar") and gla_cpu_available()))]
    if fla and dev.type == "cuda" and op in ("gla", "gla_scalar"):
        chosen.append("fla")
    return chosen


def _measure(op, backend, T, mode, batch, heads, dim, dev, dt, warmup, repeats, mamba_d_model) -> Case:
    try:
        if op == "mamba_block":
            block = _mamba_blocks(mamba_d_model, dev, dt)[backend]
            x = torch.randn(batch, T, mamba_d_model, device=dev, dtype=dt, requires_grad=True)
            run = _runner(lambda x: block(x), {"x": x}, mode)
        elif op == "lightnet_image":  # the largest square patch grid of at most T cells; batch 32 as the recipes
            side = math.isqrt(T)
            model = lightnet_image_backbones(side, 32, dev, dt)[backend]
            images = torch.randn(32, 1, 2 * side, 2 * side, device=dev, dtype=dt, requires_grad=True)
            run = _runner(lambda x: model(x), {"x": images}, mode)
        else:
            inputs = _inputs(op, batch, heads, dim, T, dev, dt)
            fn = _fla_fn(op) if backend == "fla" else _op_fn(op, backend)
            run = _runner(fn, inputs, mode)
        reps = 1 if backend == "recurrent" else repeats
        ms, peak = time_case(run, dev, warmup=0 if backend == "recurrent" else warmup, repeats=reps)
        return Case(op, backend, T, mode, ms, peak)
    except ImportError as err:
        return Case(op, backend, T, mode, None, None, note=f"not installed: {err.name}")
    except torch.OutOfMemoryError:
        return Case(op, backend, T, mode, None, None, note="out of memory")


def _fla_fn(op: str) -> Callable:
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    if op == "gla":
        return lambda q, k, v, g: chunk_gla(q, k, v, g)[0]
    return lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0]


def _line(case: Case) -> str:
    ms = f"{case.ms:10.2f} ms" if case.ms is not None else f"{'-':>13}"
    mem = f"{case.peak_mib:8.1f} MiB" if case.peak_mib is not None and not math.isnan(case.peak_mib) else ""
    flops = f"{case.gflops:7.1f} GFLOP/s" if case.gflops else ""
    return f"{case.op:<15}{case.backend:<15}T={case.T:<6}{case.mode:<8}{ms}{mem:>14} {flops} {case.note}"


def markdown(result: dict) -> str:
    """One table per mode: rows (op, backend), columns T, cells ``ms (MiB)``."""
    cases = result["cases"]
    lengths = sorted({c["T"] for c in cases})
    out = [f"device {result['machine']['device']}, {result['machine']['dtype']}, "
           f"{result['machine']['threads']} threads; matmul ceiling "
           f"{result['machine']['matmul_gflops']:.1f} GFLOP/s; shape {result['shape']}"]
    for mode in ("fwd", "fwd_bwd"):
        rows = sorted({(c["op"], c["backend"]) for c in cases if c["mode"] == mode}, key=lambda r: (OPS.index(r[0]), r[1]))
        if not rows:
            continue
        out += ["", f"**{mode}** — median ms (peak MiB)", "",
                "| op | backend | " + " | ".join(f"T={t}" for t in lengths) + " |",
                "|---|---|" + "---|" * len(lengths)]
        for op, backend in rows:
            cells = []
            for t in lengths:
                c = next((c for c in cases if (c["op"], c["backend"], c["T"], c["mode"]) == (op, backend, t, mode)), None)
                if c is None or c["ms"] is None:
                    cells.append("–" if c is None else c["note"] or "–")
                else:
                    extra = f", {c['gflops']:.0f} GF/s" if c.get("gflops") else ""
                    mem = c["peak_mib"]
                    cells.append(f"{c['ms']:.1f} ({mem:.0f}{extra})" if mem == mem else f"{c['ms']:.1f}")
            out.append(f"| {op} | {backend} | " + " | ".join(cells) + " |")
    out += ["", "Ratios (forward + backward):", ""] + ratio_lines(cases)
    return "\n".join(out)


def ratio_lines(cases: list[dict]) -> list[str]:
    """chunked (``chunk``, ``cpu``) vs recurrent speed-ups, their time over causal SDPA's, the
    Mamba block and LightNet speed-ups."""
    ms = {(c["op"], c["backend"], c["T"]): c["ms"] for c in cases if c["mode"] == "fwd_bwd" and c["ms"]}
    lines = []
    for (op, backend, t), value in sorted(ms.items()):
        if backend in ("chunk", "cpu") and (op, "recurrent", t) in ms:
            lines.append(f"- {op} T={t}: {backend} {ms[(op, 'recurrent', t)] / value:.0f}x faster than recurrent")
        if backend in ("chunk", "cpu") and ("sdpa", "sdpa", t) in ms:
            lines.append(f"- {op} T={t}: {backend} takes {value / ms[('sdpa', 'sdpa', t)]:.2f}x the time of causal SDPA")
        if backend == "native" and (op, "scan4", t) in ms:
            lines.append(f"- LightNet image backbone, {t} patches: one native scan {ms[(op, 'scan4', t)] / value:.2f}x "
                         "faster than four raster scans")
        if backend == "seqapps_chunk" and (op, "mambapy", t) in ms:
            lines.append(f"- Mamba block T={t}: seqapps chunk scan {ms[(op, 'mambapy', t)] / value:.2f}x faster "
                         "than mambapy's parallel scan")
    return lines


def write_result(result: dict, out: str | Path) -> Path:
    from seqapps.runs import atomic_write_text

    out = Path(out)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result) + "\n")
    return out
