"""Shared fixtures: running the real CLI in a subprocess, tiny configs, tiny CSVs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Triton kernels run under the interpreter on a machine without a GPU; the variable must be
# set before anything imports triton (torch.compile tests do). On a GPU machine, run the suite
# with TRITON_INTERPRET=0 to test the compiled kernels.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is many small tensor ops: one thread avoids the cost of two threads waiting on
# each other (and on whatever else shares the two cores). Subprocesses get the same setting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tiny and quiet: the AR generator, short windows, two epochs, no progress bar.
TINY = ["data.dataset=ar", "data.ar.n_samples=600", "data.seq_len=8", "data.pred_len=4",
        "data.batch_size=32", "trainer.max_epochs=2", "callbacks=none",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "module.seasonal_period=4"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m seqapps <args>`` in ``cwd``; returns the finished process (text output)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "seqapps", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def only_run_dir(runs: Path) -> Path:
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def write_tslib_csv(path: Path, n: int = 400, seed: int = 0, columns=("a", "b", "OT")) -> Path:
    """A small CSV in the Time-Series-Library layout: hourly dates, daily seasonality + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    data = {"date": pd.date_range("2020-01-01", periods=n, freq="h")}
    for i, c in enumerate(columns):
        data[c] = np.sin(2 * np.pi * (t + 3 * i) / 24) * (1 + i) + 0.1 * rng.normal(size=n) + i
    pd.DataFrame(data).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny `seqapps train` through the real CLI, shared by the shell tests."""
    cwd = tmp_path_factory.mktemp("trained")
    proc = run_cli("train", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(cwd / "runs")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def fit_classifier(model: torch.nn.Module, batches, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of cross-entropy on ``batches()`` (a callable returning ``(x, labels)``,
    a fresh or the same batch each time); the training losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = batches()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
