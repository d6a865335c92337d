"""Building the C kernels in ``kernels/cpu/`` at first use, and loading them with ``ctypes``.

A kernel is one C file with no dependency beyond libc, pthreads and, where the compiler has it,
OpenMP (whose ``libgomp.so.1`` is then the one PyTorch has loaded). It is compiled once per
machine with the system's C compiler (``$CC``, else ``cc``) for the processor at hand
(``-O3 -march=native -fopenmp``, each of the last two dropped where the compiler refuses it, plus
``$SEQAPPS_CFLAGS``), into ``kernels/`` of :func:`cache_root` (``$SEQAPPS_CACHE``, else
``$XDG_CACHE_HOME/seqapps``, else ``~/.cache/seqapps``) under a name that hashes the source, the
flags and the processor, so an edit or another machine builds afresh. The library is written to a
temporary name and renamed into place: a build that fails or is interrupted leaves nothing
half-written. Without a compiler (or with ``SEQAPPS_CPU_KERNELS=0``)
``library()`` returns ``None`` and the callers use the PyTorch implementations; the reason is
given once as a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = Path(__file__).parent / "cpu"
# No flag that reassociates arithmetic (exp's rounding step depends on its order) or assumes finite values.
_OPTIMISE = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
# OpenMP first (a kernel then runs on the threads of PyTorch's own OpenMP runtime), then without it
# (pthreads); each with -march=native, then without it for compilers that lack it.
_FLAG_SETS = tuple(_OPTIMISE + arch + openmp for openmp in (["-fopenmp"], []) for arch in (["-march=native"], []))


def cache_root() -> Path:
    """The folder of everything seqapps builds or generates once per machine (compiled kernels
    here, generated LMs and embeddings in the tasks): ``$SEQAPPS_CACHE``, else
    ``$XDG_CACHE_HOME/seqapps``, else ``~/.cache/seqapps``."""
    root = os.environ.get("SEQAPPS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "seqapps")
    return Path(root)


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _processor() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled ``kernels/cpu/<name>.c``, built on first use; ``None`` (with one warning) when
    it cannot be built here or CPU kernels are switched off."""
    if os.environ.get("SEQAPPS_CPU_KERNELS", "1") == "0":
        return None
    source = SOURCES / f"{name}.c"
    compiler = os.environ.get("CC", "cc")
    problems = []
    for flags in _FLAG_SETS:
        command = [compiler, *flags, *os.environ.get("SEQAPPS_CFLAGS", "").split(), "-shared", "-fPIC", "-pthread"]
        digest = hashlib.sha256("\0".join([source.read_text(), *command, platform.machine(), _processor()]).encode())
        target = cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"
        if not target.exists():
            try:
                _build(command, source, target)
            except (OSError, subprocess.SubprocessError) as error:  # no compiler, a refused flag, a timeout
                problems.append(_reason(error))
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as error:
            problems.append(str(error))
    warnings.warn(f"seqapps: the CPU kernel '{name}' could not be built ({problems[-1]}); using the PyTorch "
                  f"implementation instead (install a C compiler, or set CC, to get the fast one)", stacklevel=3)
    return None


def _build(command: list[str], source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".so")
    os.close(handle)
    try:
        subprocess.run([*command, "-o", partial, str(source)], check=True, capture_output=True, text=True, timeout=300)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _reason(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or "").strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or [f"exit {error.returncode}"])[0]
    return str(error)
