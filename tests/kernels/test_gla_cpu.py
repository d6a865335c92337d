"""The fused C kernel for GLA (``backend="cpu"``): when ``auto`` picks it, how it is built, and
what happens where it cannot be built. Its numbers against ``recurrent`` are in test_gla.py."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from kernel_harness import rel_rms, run_with_grads
from test_gla import _Attention, make_inputs

from seqapps.errors import InputError
from seqapps.kernels.gla import gated_linear_attention
from seqapps.kernels.gla_cpu import available

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler: the fused CPU kernel is not built")


def _chosen_backend(monkeypatch, **inputs) -> str:
    """Which implementation ``auto`` runs, seen by wrapping both."""
    import seqapps.kernels.gla_chunk as chunk_module
    import seqapps.kernels.gla_cpu as cpu_module

    chosen = []
    for module, name in ((chunk_module, "gla_chunk"), (cpu_module, "gla_cpu")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: chosen.append(_n) or _f(*a, **kw))
    gated_linear_attention(**inputs)
    return chosen[0]


def test_auto_picks_the_c_kernel_for_float32_and_bf16_on_the_cpu(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        assert _chosen_backend(monkeypatch, **make_inputs(1, 20, 2, 8, 8, gate="per-key", dtype=dtype)) == "gla_cpu"


def test_auto_sends_float64_to_chunk_and_cpu_refuses_it(monkeypatch):
    inputs = make_inputs(1, 20, 2, 8, 8, gate="per-key", dtype=torch.float64)
    assert _chosen_backend(monkeypatch, **inputs) == "gla_chunk"
    with pytest.raises(InputError, match="float32"):
        gated_linear_attention(**inputs, backend="cpu")


def test_auto_exports_through_the_traceable_chunk_form():
    """While ``torch.export`` traces, ``auto`` must not pick the C kernel (an opaque call)."""

    class Auto(_Attention):
        def forward(self, q, k, v, g, state):
            return gated_linear_attention(q, k, v, g, initial_state=state, output_final_state=True)

    args = tuple(make_inputs(1, 20, 2, 4, 3, gate="per-key").values())
    out, state = torch.export.export(Auto(), args).module()(*args)
    expected_out, expected_state = Auto()(*args)
    assert rel_rms(out, expected_out) < 1e-5 and rel_rms(state, expected_state) < 1e-5


@pytest.mark.parametrize("batch, heads", [(2, 3), (1, 4), (3, 4)])
def test_threads_change_nothing(batch, heads):
    """Each thread takes whole sequences (one, or a batch entry's heads side by side), so any number
    of threads gives the same bits; these shapes deal out units of 1, 2 and all heads."""
    inputs = make_inputs(batch, 70, heads, 16, 16, gate="per-key")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_with_grads(lambda **kw: gated_linear_attention(**kw, backend="cpu"), inputs))
    finally:
        torch.set_num_threads(before)
    for result in results[1:]:
        for name in results[0]:
            assert torch.equal(results[0][name], result[name]), name
    reference = run_with_grads(lambda **kw: gated_linear_attention(**kw, backend="recurrent"), inputs)
    for name in reference:
        assert rel_rms(results[0][name], reference[name]) < 1e-5, name


def test_runs_on_pytorchs_own_openmp_threads():
    """Built with OpenMP, the kernel links libgomp.so.1: the copy PyTorch loaded must serve it, so
    that one pool of threads does both (a second runtime would put its threads beside PyTorch's)."""
    torch_gomp = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not (os.path.exists(torch_gomp) and os.path.exists("/proc/self/maps")):
        pytest.skip("PyTorch ships no libgomp.so.1 here (macOS, Windows), or /proc cannot show the libraries "
                    "mapped: no shared OpenMP runtime to check")
    assert available()  # loaded
    maps = open("/proc/self/maps").read()
    gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert gomp == {os.path.realpath(torch_gomp)}, gomp


def test_gradient_of_the_output_alone():
    """With the final state unused, autograd hands the backward no state gradient."""
    inputs = {name: x.requires_grad_() for name, x in make_inputs(1, 40, 2, 8, 8, gate="per-head").items()}
    gated_linear_attention(**inputs, backend="cpu")[0].square().sum().backward()
    reference = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    gated_linear_attention(**reference, backend="recurrent")[0].square().sum().backward()
    for name in inputs:
        assert rel_rms(inputs[name].grad, reference[name].grad) < 1e-5, name


_PROBE = """
import warnings
warnings.simplefilter("always")
from seqapps.errors import InputError
from seqapps.kernels.gla import gated_linear_attention
from seqapps.kernels.gla_cpu import available
import torch
q = torch.randn(1, 10, 1, 4)
out, _ = gated_linear_attention(q, q, q, -torch.rand(1, 10, 1, 4))
print("available", available(), "finite", bool(torch.isfinite(out).all()))
try:
    gated_linear_attention(q, q, q, -torch.rand(1, 10, 1, 4), backend="cpu")
except InputError as error:
    print("refused:", error)
"""


def _probe(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SEQAPPS_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environment,
                          timeout=300, check=True, cwd=tmp_path)  # not the checkout: its folders shadow the install


def test_builds_into_the_cache_and_reuses_it(tmp_path):
    first = _probe(tmp_path)
    assert "available True finite True" in first.stdout, first.stderr
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert [p.suffix for p in built] == [".so"], built  # the library alone: no temporary left
    stamp = built[0].stat().st_mtime_ns
    _probe(tmp_path)
    assert built[0].stat().st_mtime_ns == stamp  # not rebuilt


@pytest.mark.parametrize("env", [{"CC": "false"}, {"SEQAPPS_CPU_KERNELS": "0"}], ids=["compiler fails", "switched off"])
def test_without_the_kernel_auto_falls_back_and_cpu_says_why(tmp_path, env):
    result = _probe(tmp_path, **env)
    assert "available False finite True" in result.stdout, result.stderr
    refusal = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert refusal and "backend='chunk'" in refusal[0]
    if "CC" in env:
        assert result.stderr.count("could not be built") == 1, result.stderr  # one warning, not one per call
        cache = tmp_path / "cache" / "kernels"
        assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_a_build_that_times_out_falls_back_too(tmp_path, monkeypatch):
    from seqapps.kernels import compiled

    def too_slow(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs.get("timeout"))

    monkeypatch.setenv("SEQAPPS_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled.subprocess, "run", too_slow)
    with pytest.warns(UserWarning, match="could not be built .*timed out"):
        assert compiled.library.__wrapped__("gla") is None
    assert not any((tmp_path / "kernels").iterdir())  # nothing half-written


_NARROW_SIMD = """
import torch
from seqapps.kernels.gla import gated_linear_attention
gen = torch.Generator().manual_seed(0)
q, k = torch.randn(2, 150, 2, 24, generator=gen), torch.randn(2, 150, 2, 24, generator=gen)
v, g = torch.randn(2, 150, 2, 40, generator=gen), -torch.rand(2, 150, 2, 24, generator=gen)
got, ref = (gated_linear_attention(q, k, v, g, backend=b)[0] for b in ("cpu", "recurrent"))
print("rel", ((got - ref).norm() / ref.norm()).item())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 SIMD flags")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx -mno-avx2 -mno-avx512f", "-fno-openmp"],
                         ids=["AVX2", "SSE", "pthreads"])
def test_other_builds_agree(tmp_path, flags):
    """The vector width is chosen at compile time (16 lanes with AVX-512, 8 with AVX2, 4 otherwise):
    a laptop without AVX-512 gets the other two; a compiler without OpenMP gives pthreads. Each must
    give the same numbers."""
    environment = {**os.environ, "SEQAPPS_CACHE": str(tmp_path), "SEQAPPS_CFLAGS": flags}
    result = subprocess.run([sys.executable, "-c", _NARROW_SIMD], capture_output=True, text=True, env=environment,
                            timeout=300, check=True, cwd=tmp_path)
    assert "could not be built" not in result.stderr, result.stderr
    assert float(result.stdout.split()[-1]) < 1e-5, result.stdout
