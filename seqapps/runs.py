"""Run folders, atomic file writes, and the checkpoint plumbing that makes a killed run
resumable: checkpoints written to a temporary file and renamed into place, RNG states saved."""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from seqapps.errors import InputError

RUN_DIR_ENV = "SEQAPPS_RUN_DIR"  # shared with the worker processes that DDP starts


def new_run_dir(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<date>_<time>_<name>``, made unique; not created yet."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(root) / f"{stamp}_{name}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def expect_writable(path: str | os.PathLike, option: str, folder: bool = False) -> Path:
    """Raise one line unless a file (``folder``: a folder, replacing one that is there) can be
    written at ``path``, its parent folders created as needed: checked before a long job, so that
    its result is not lost at the end."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{option}={path} is a folder; give the path of a file inside it")
    if path.is_file() and folder:
        raise InputError(f"{option}={path} is a file; give the path of a folder")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):  # what writing there needs, tried (and removed)
            pass
    except OSError:
        raise InputError(f"{option}={path}: files cannot be written in {existing}; choose another path") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new
    one, never half of one: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but a checkpoint is serialised in memory and renamed into
    place, so a training killed at any moment leaves the previous complete ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())


class RNGState(Callback):
    """Saves the Python, NumPy and torch RNG states in each checkpoint and restores them on
    resume, so a resumed run continues with the random numbers an unbroken run would draw."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def resolve_checkpoint(run: str | None, ckpt: str | None, which: str = "best", option: str = "run") -> Path:
    """The checkpoint named by ``ckpt=``, or the ``best``/``last`` one of the run folder ``run``
    (given as the option ``option``, named in the errors)."""
    if ckpt:
        path = Path(ckpt)
        if not path.is_file():
            raise InputError(f"ckpt: no checkpoint at '{path}'; give a .ckpt file (e.g. "
                             "runs/<run>/checkpoints/last.ckpt) or run=<run folder>")
        return path
    if not run:
        raise InputError("no model given: pass run=<run folder> or ckpt=<checkpoint file>")
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        raise InputError(f"{option}: '{run}' is not a run folder (no checkpoints/ inside); give a folder "
                         "written by `seqapps train`, e.g. runs/<date>_<time>_<name>")
    if which not in ("best", "last"):
        raise InputError(f"which='{which}': choose best or last")
    candidates = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime) if which == "best" else []
    if not candidates and (folder / "last.ckpt").is_file():
        candidates = [folder / "last.ckpt"]
    if not candidates:
        raise InputError(f"{option}: '{run}' holds no checkpoint yet ({folder} is empty)")
    return candidates[-1]


def load_checkpoint_dict(path: str | os.PathLike) -> dict:
    """The saved dictionary of a checkpoint file; one line if the file is not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        # torch's unpickling errors are paragraphs about weights_only; the others say what broke
        lines = [] if isinstance(error, pickle.UnpicklingError) else str(error).strip().splitlines()
        reason = (lines or [f"{type(error).__name__}: not a checkpoint's format"])[0][:160]
        raise InputError(f"'{path}' is not a readable PyTorch checkpoint ({reason}); give a .ckpt written by "
                         "`seqapps train`") from None


def load_module(path: str | os.PathLike):
    """The task module of a seqapps checkpoint, on the CPU, in eval mode."""
    from seqapps.tasks.build import locate

    info = load_checkpoint_dict(path).get("seqapps")
    if not info:
        raise InputError(f"'{path}' is not a seqapps checkpoint (no 'seqapps' entry); give one "
                         "written by `seqapps train`")
    module = locate(info["module"]).load_from_checkpoint(path, map_location="cpu")
    return module.eval()


def run_test_metrics(ckpt: str | Path) -> dict:
    """The test metrics of the run a checkpoint belongs to (``<run>/test_metrics.json`` beside
    ``<run>/checkpoints/``); empty when the run was not tested or the file is elsewhere."""
    path = Path(ckpt).resolve().parent.parent / "test_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
