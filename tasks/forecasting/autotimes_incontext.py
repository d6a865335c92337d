"""The generated series of the AutoTimes in-context experiment (issue 5's claim: "in-context
forecasting improves over zero-shot on held-out series when the prompt comes from the same
source"): a *source* family the LM and the adapters are trained on, and a held-out *target*
family of another shape, period range and scale pattern, written as Time-Series-Library CSVs.

The experiment itself (both training stages per seed, the conditions, the recorded results) is
driven from the shell: ``python -m seqapps.autotimes_incontext`` (seqapps/autotimes_incontext.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqapps.errors import InputError

FAMILIES = ("source", "target", "source_jumps")


def periodic_family(kind: str, n_series: int, length: int, seed: int) -> pd.DataFrame:
    """``n_series`` generated series (one column each, Time-Series-Library layout: a ``date``
    column, hourly) of ``length`` rows.

    ``source``: ``sum_k a_k sin(2 pi k t / P + phi_k)``, ``k = 1..3``, ``a_k ~ N(0, 1/k)``,
    ``P`` uniform in 8..48, noise std 0.1 of the pattern's, a random level and scale.
    ``target``: a square wave (random duty 0.2..0.8) or a sawtooth, ``P`` uniform in 20..40, its
    amplitude drifting slowly (x0.5..x1.5 over about 300 rows), noise std 0.1.
    ``source_jumps``: ``source`` whose phase jumps to a random value every 16..64 rows (the
    period and shape stay): a corpus in which what persists across a break is the pattern, not
    its continuation — an LM pretraining corpus for detached prompts.
    """
    if kind not in FAMILIES:
        raise InputError(f"family '{kind}': choose one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, FAMILIES.index(kind)])
    t = np.arange(length, dtype=np.float64)
    columns = {}
    for i in range(n_series):
        if kind in ("source", "source_jumps"):
            period = rng.uniform(8, 48)
            cycles = t / period
            if kind == "source_jumps":
                cuts = np.cumsum(rng.integers(16, 65, size=length // 16 + 1))
                cycles = cycles + rng.uniform(0, 1, len(cuts) + 1)[np.searchsorted(cuts, t, side="right")]
            wave = sum(rng.normal(0, 1 / k) * np.sin(2 * np.pi * k * cycles + rng.uniform(0, 2 * np.pi))
                       for k in (1, 2, 3))
        else:
            period = rng.uniform(20, 40)
            phase = (t / period + rng.uniform()) % 1.0
            wave = (phase < rng.uniform(0.2, 0.8)).astype(np.float64) if rng.uniform() < 0.5 else phase
            wave = (wave - wave.mean()) * (1 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(250, 350)
                                                             + rng.uniform(0, 2 * np.pi)))
        wave = wave / wave.std()
        wave = wave + rng.normal(0, 0.1, length)
        columns[f"{kind}{i}"] = rng.uniform(-5, 5) + rng.uniform(0.5, 3) * wave
    dates = pd.date_range("2001-01-01", periods=length, freq="h")
    return pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M:%S"), **columns})


def write_families(folder: str | Path, seed: int, n_source: int = 64, n_target: int = 32,
                   source_len: int = 3000, target_len: int = 1500, lm_corpus: str = "source") -> dict[str, Path]:
    """The CSVs of one seed: ``source_lm`` (LM pretraining, of family ``lm_corpus``), ``source``
    (the AutoTimes adapters; other draws of the source family) and ``target`` (held out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, kind, n, length, s in (("source_lm", lm_corpus, n_source, source_len, 2 * seed),
                                     ("source", "source", n_source, source_len, 2 * seed + 1),
                                     ("target", "target", n_target, target_len, seed)):
        paths[name] = folder / f"{name}_seed{seed}.csv"
        periodic_family(kind, n, length, s).to_csv(paths[name], index=False)
    return paths
