"""`seqapps bench` runs every op and anchor and reports a table and JSON (no timing asserted); a bad
option, or an `out` that cannot be written, is refused in one line before anything runs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli

from seqapps.bench import markdown, run_bench
from seqapps.errors import InputError
from seqapps.kernels.gla_cpu import available as cpu_kernel_available


def test_run_bench_measures_each_case_and_tabulates():
    result = run_bench(ops=("gla", "gla_scalar", "delta_rule", "selective_scan", "sdpa", "mamba_block", "lightnet_image"),
                       backends=("recurrent", "chunk", "cpu"), lengths=(16, 32), repeats=1, recurrent_max_len=16,
                       batch=1, heads=2, dim=8, mamba_d_model=16, log=lambda _: None)
    cases = {(c["op"], c["backend"], c["T"], c["mode"]): c for c in result["cases"]}
    assert ("gla", "recurrent", 32, "fwd") not in cases  # past recurrent_max_len
    for op in ("gla", "gla_scalar", "delta_rule", "selective_scan"):
        for mode in ("fwd", "fwd_bwd"):
            assert cases[(op, "chunk", 32, mode)]["ms"] > 0
            assert cases[(op, "recurrent", 16, mode)]["ms"] > 0
    assert cases[("gla_scalar", "chunk", 32, "fwd_bwd")]["gflops"] > 0
    if cpu_kernel_available():  # the fused C kernel: GLA ops only
        assert cases[("gla", "cpu", 32, "fwd_bwd")]["ms"] > 0 and cases[("gla_scalar", "cpu", 32, "fwd")]["gflops"] > 0
    assert not any(backend == "cpu" for op, backend, _, _ in cases if op not in ("gla", "gla_scalar"))
    assert cases[("mamba_block", "mambapy", 16, "fwd_bwd")]["ms"] > 0
    assert cases[("mamba_block", "seqapps_chunk", 16, "fwd_bwd")]["ms"] > 0
    assert cases[("lightnet_image", "native", 16, "fwd_bwd")]["ms"] > 0
    assert cases[("lightnet_image", "scan4", 16, "fwd_bwd")]["ms"] > 0
    assert result["machine"]["matmul_gflops"] > 0
    table = markdown(result)
    assert "| gla | chunk |" in table and "faster than recurrent" in table and "Mamba block" in table
    assert "one native scan" in table


def test_bench_cli_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "ops=[gla,sdpa]", "backends=[chunk]", "lengths=[32]", "repeats=1", "batch=1",
                   "heads=2", "dim=8", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {c["op"] for c in data["cases"]} == {"gla", "sdpa"}
    assert "| sdpa | sdpa |" in out.with_suffix(".md").read_text()
    proc = run_cli("bench", "ops=[nope]", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown op 'nope'" in proc.stderr


@pytest.mark.parametrize("option, value, message", [
    ("ops", ["gla", "glaa"], "unknown op 'glaa'"),
    ("ops", [], "ops=[]"),
    ("backends", ["gpu"], "unknown backend 'gpu'"),
    ("modes", ["back"], "unknown mode 'back'"),
    ("lengths", [512, 0], "lengths=[512, 0]; expected integers"),
    ("lengths", "abc", "lengths='abc'"),
    ("batch", -1, "batch=-1; expected an integer of at least 1"),
    ("repeats", 0, "repeats=0"),
    ("warmup", 1.5, "warmup=1.5"),
    ("dtype", "float8", "dtype='float8'; choose from"),
    ("device", "tpu", "device='tpu'; expected auto, cpu or cuda"),
])
def test_bad_options_are_refused_before_anything_runs(option, value, message):
    logged = []
    with pytest.raises(InputError, match=re.escape(message)):
        run_bench(**{option: value}, log=logged.append)
    assert not logged  # refused before the matmul ceiling is even measured


def test_bench_cli_refuses_an_unwritable_out_before_running(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, message in ((tmp_path, "is a folder"), (blocker / "bench.json", "files cannot be written in")):
        proc = run_cli("bench", "ops=[sdpa]", "lengths=[16]", f"out={out}", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert "matmul ceiling" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_cuda_device_beyond_those_visible_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"device='cuda:5' but only 1 CUDA GPU\(s\) are visible"):
        run_bench(device="cuda:5", log=lambda _: None)
