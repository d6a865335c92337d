"""A killed training resumes to the same result; DDP on CPU; the wheel carries every part (the C
kernels' sources included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import only_run_dir, read_json

REPO = Path(__file__).resolve().parents[2]
# long enough epochs (about 0.3 s each on 2 cores) to be killed in the middle of training
RESUMABLE = ["data.dataset=ar", "data.ar.n_samples=12000", "data.seq_len=16", "data.pred_len=4",
             "data.batch_size=16", "trainer.max_epochs=6", "callbacks=none", "module.seasonal_period=4",
             "trainer.enable_progress_bar=false", "export=false", "module.net.hidden=[32]",
             "logger.tensorboard=null"]


def _train(cwd: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen([sys.executable, "-m", "seqapps", "train", *RESUMABLE, *extra], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_run_resumes_from_last_ckpt_to_the_same_metrics(tmp_path):
    (tmp_path / "ref").mkdir()
    reference = _train(tmp_path / "ref")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    expected = read_json(only_run_dir(tmp_path / "ref" / "runs") / "test_metrics.json")

    (tmp_path / "killed").mkdir()
    victim = _train(tmp_path / "killed")
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and victim.poll() is None:
        found = list((tmp_path / "killed").glob("runs/*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    assert last is not None, "no last.ckpt appeared"
    time.sleep(0.5)  # somewhere in a later epoch, maybe in the middle of writing a checkpoint
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "training ended before it could be killed"

    resumed = _train(tmp_path / "killed", f"ckpt_path={last}")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    got = read_json(last.parent.parent / "test_metrics.json")
    for key in ("test/model/mse", "test/model/mae", "test/classic_ar/mse"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_ddp_trains_with_two_processes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "seqapps", "train", "trainer=ddp", "trainer.devices=2",
                           "data.dataset=ar", "data.ar.n_samples=600", "data.seq_len=8", "data.pred_len=4",
                           "trainer.max_epochs=2", "callbacks=none", "trainer.enable_progress_bar=false",
                           "module.seasonal_period=4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # Lightning started a second process
    run = only_run_dir(tmp_path / "runs")  # both processes wrote into one run folder
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_wheel_contains_every_package_and_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("seqapps-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("seqapps", "seqapps"), ("backbones", "seqapps/backbones"),
                            ("kernels", "seqapps/kernels"), ("tasks", "seqapps/tasks"), ("conf", "seqapps/conf")):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yaml", ".c") and "__pycache__" not in path.parts:
                assert f"{package}/{path.relative_to(REPO / folder).as_posix()}" in names, path
    assert "seqapps/conf/task/forecast_arnet.yaml" in names
