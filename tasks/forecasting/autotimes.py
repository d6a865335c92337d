"""AutoTimes (Liu et al., 2024, "AutoTimes: Autoregressive Time Series Forecasters via Large
Language Models"): a frozen causal language model as an autoregressive forecaster.

Each channel is its own series (channel independence), normalised by the mean and std of its
lookback. The lookback is cut into non-overlapping segments of ``token_len`` steps; a trainable
linear layer (or MLP) embeds each segment into the LM's width, the frozen LM runs over the
segment tokens causally, and a trainable layer projects every output back to a segment: the
output at position ``i`` is trained (MSE) to be segment ``i + 1``. When timestamps are given,
each token is ``SE / |SE| + scale * PE / |PE|``, ``PE`` being the LM's embedding of the text
"This is Time Series from {start} to {end}" of that segment (computed once, in the data
module) and ``scale`` trainable. Forecasting any horizon rolls the model: each forecast segment
is embedded and fed back (the KV cache of a transformer, or the constant-size state of a
recurrent seqapps stack), so one model trained at one context serves every horizon; a prompt of
segments from another series can be prepended (in-context forecasting).

The LM is pluggable (``lm`` spec, a plain mapping):

* ``{kind: hf, path: <folder>}``: any Hugging Face causal LM saved in a local folder
  (``AutoModelForCausalLM.from_pretrained``, nothing downloaded). ``path: null`` generates a
  *randomly initialised* tiny GPT-2 and a byte-level BPE tokenizer (options ``tiny``) under the
  cache folder — a stand-in that makes the task run anywhere, not a pretrained language model.
* ``{kind: stack, stack: {dim, depth, mixer, ...}, seed, weights}``: a seqapps :class:`SequenceStack`
  (any mixer) as the LM; a recurrent mixer forecasts with constant memory per step. Its text
  embedding is a byte embedding table run through the same stack. Random unless trained: use
  ``module.freeze=full`` to train it with the rest, or ``weights: <a checkpoint of such a run>``
  to load the LM trained there (its ``net.backbone.*`` tensors; ``module.freeze`` keeps it frozen).
* ``{kind: identity, width}``: no LM (the paper's "w/o LLM" ablation).

Trainable parameters with ``module.freeze=frozen_backbone`` (the default): the segment
embedding ``embed``, the projection ``head`` and ``pos_scale`` only —
``2 * token_len * D + token_len + D + 1`` with linear layers.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqapps.errors import InputError
from seqapps.tasks import plotting
from seqapps.tasks.forecasting.autotimes_data import cache_root
from seqapps.tasks.forecasting.baselines import SeasonalNaive
from seqapps.tasks.forecasting.metrics import forecast_metrics
from seqapps.tasks.forecasting.module import ForecastModule
from seqapps.tasks.forecasting.revin import lookback_stats
from seqapps.tasks.forecasting.text_lm import byte_bpe_tokenizer, gpt2, save_lm_folder

LM_KINDS = ("hf", "stack", "identity")
TINY_DEFAULTS = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256, "seed": 0}


# --------------------------------------------------------------------------- language models
class CausalLM(nn.Module):
    """What AutoTimes needs of a language model.

    ``forward(embeds [B, N, D], state=None, use_cache=False) -> (hidden [B, N, D], state)``:
    the last hidden states, causal in ``N``; ``state`` carries the context to later calls
    (KV cache or recurrent state). ``embed_texts(texts, pool) -> [n, D]``.
    """

    width: int
    max_tokens: int | None = None

    def embed_texts(self, texts: Sequence[str], pool: str = "last") -> torch.Tensor:
        raise InputError(f"{type(self).__name__} cannot embed text; give data.timestamps.lm an LM that can")


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """``hidden [n, T, D]``, ``mask [n, T]`` (1 on real tokens, right padded) -> ``[n, D]``:
    the last real token's state, or the mean over real tokens."""
    if pool == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    last = mask.long().sum(1) - 1
    return hidden[torch.arange(len(hidden)), last]


class HFCausalLM(CausalLM):
    """A Hugging Face ``transformers`` causal LM from a local folder (its base model is used:
    hidden states, no vocabulary head)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"lm.path: no folder at '{path}'; give a local folder saved with save_pretrained "
                             "(config.json and weights; `python -m seqapps.text_lm --out <folder>` makes a small "
                             "one pretrained on local text), or lm.path=null for a tiny random GPT-2")
        if not (path / "config.json").is_file():
            raise InputError(f"lm.path: '{path}' holds no config.json; it is not a transformers model folder")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        except (ValueError, KeyError, OSError) as err:
            raise InputError(f"lm.path: '{path}' is not a causal language model that transformers can load "
                             f"({' '.join(str(err).split())[:160]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.path = str(path)
        self.model = model
        self.width = int(model.config.hidden_size)
        self.max_tokens = getattr(model.config, "max_position_embeddings", None)
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._tokenizer = None
        self._check_causal()

    @torch.no_grad()
    def _check_causal(self) -> None:
        """Outputs at earlier positions must not depend on later inputs (a bidirectional
        encoder loaded through a causal-LM head fails this)."""
        was_training = self.model.training
        self.model.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, self.width, generator=g)
        y = x.clone()
        y[:, -1] = torch.randn(self.width, generator=g)  # not a constant shift: a LayerNorm removes those
        a, b = self(x)[0], self(y)[0]
        self.model.train(was_training)
        if not torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5):
            raise InputError(f"lm.path: '{self.path}' is not a causal LM: its outputs at earlier positions "
                             "depend on later inputs (an encoder such as BERT); AutoTimes needs a decoder-only LM")

    def forward(self, embeds: torch.Tensor, state=None, use_cache: bool = False):
        kwargs = {self._cache_kw: state} if state is not None else {}
        out = self.model.base_model(inputs_embeds=embeds, use_cache=use_cache or state is not None, **kwargs)
        cache = None
        if use_cache or state is not None:
            cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.last_hidden_state, cache

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (ValueError, OSError) as err:
                raise InputError(f"lm.path: '{self.path}' has no usable tokenizer for the timestamp texts "
                                 f"({' '.join(str(err).split())[:160]})") from None
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            tok.padding_side = "right"
            self._tokenizer = tok
        return self._tokenizer

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], pool: str = "last") -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool_hidden(hidden, mask, pool)


class StackLM(CausalLM):
    """A seqapps :class:`~seqapps.backbones.SequenceStack` as a causal LM over segment tokens.

    Built under ``seed``, so every copy (the model's, the data module's for the timestamp
    texts) has the same initial weights. Text: UTF-8 bytes and an end token through a byte
    embedding table, then the stack.
    """

    def __init__(self, stack: Mapping, seed: int = 0, weights: str | os.PathLike | None = None):
        super().__init__()
        from seqapps.backbones import SequenceStack

        stack = {k: v for k, v in dict(stack).items() if k != "_target_"}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stack = SequenceStack(**stack)
            self.text_embedding = nn.Embedding(257, self.stack.dim)  # 256 bytes + end of text
        self.width = self.stack.dim
        if weights:
            self.load_trained(weights)

    def load_trained(self, path: str | os.PathLike) -> None:
        """The LM of a checkpoint written by an AutoTimes run that trained it (``net.backbone.*``)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"lm.weights: no checkpoint at '{path}'; give the .ckpt of an AutoTimes run "
                             "with lm.kind=stack and module.freeze=full")
        state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
        prefix = "net.backbone."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        mine = self.state_dict()
        if set(own) != set(mine) or any(own[k].shape != mine[k].shape for k in mine):
            raise InputError(f"lm.weights: '{path}' holds no stack LM of this shape (lm.stack must match the "
                             "run that trained it, and that run must not have frozen it)")
        self.load_state_dict(own)

    def forward(self, embeds: torch.Tensor, state=None, use_cache: bool = False):
        hidden, state = self.stack(embeds, state)
        return hidden, state if use_cache else None

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], pool: str = "last") -> torch.Tensor:
        codes = [list(t.encode()) + [256] for t in texts]
        n = max(map(len, codes))
        ids = torch.tensor([c + [256] * (n - len(c)) for c in codes])
        mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in codes])
        device = self.text_embedding.weight.device
        hidden, _ = self.stack(self.text_embedding(ids.to(device)))
        return pool_hidden(hidden, mask.to(device), pool)


class IdentityLM(CausalLM):
    """No language model: each token's output is its input (the "w/o LLM" ablation)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)

    def forward(self, embeds: torch.Tensor, state=None, use_cache: bool = False):
        return embeds, None


def _check_kind(spec: Mapping) -> str:
    kind = spec.get("kind", "hf")
    if kind not in LM_KINDS:
        raise InputError(f"lm.kind='{kind}' is not a kind of LM; choose hf (a transformers folder), "
                         "stack (a seqapps stack) or identity (no LM)")
    return kind


def tiny_lm_folder(tiny: Mapping | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    opts = {**TINY_DEFAULTS, **dict(tiny or {})}
    name = "tiny-gpt2-" + "-".join(f"{k}{opts[k]}" for k in sorted(opts))
    return cache_root(cache_dir) / "autotimes" / "lms" / name


def make_tiny_lm(folder: str | os.PathLike, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                 n_positions: int = 256, seed: int = 0) -> Path:
    """Write a randomly initialised GPT-2 and a byte-level BPE tokenizer (trained on timestamp
    texts) to ``folder``, offline; written under a temporary name and renamed into place.
    It is a stand-in LM for running the task anywhere, not a pretrained language model
    (``text_lm.pretrain_text_lm`` makes one pretrained on local text)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    from seqapps.tasks.forecasting.autotimes_data import timestamp_corpus

    corpus = timestamp_corpus() + ["time series forecast", "0123456789 -:"]
    tokenizer = byte_bpe_tokenizer(corpus, vocab_size=512)
    model = gpt2(tokenizer, n_layer, n_embd, n_head, n_positions, seed)
    save_lm_folder(model, tokenizer, folder, {"README.md": (
        "A randomly initialised GPT-2 (not pretrained) and a byte-level BPE tokenizer, generated by "
        f"seqapps for AutoTimes: n_layer={n_layer}, n_embd={n_embd}, n_head={n_head}, seed={seed}.\n")})
    return folder  # this one, or the same one another process wrote first


def resolve_hf_path(spec: Mapping, cache_dir: str | os.PathLike | None = None) -> Path:
    """``lm.path``, or the generated tiny random GPT-2 (made on first use) when it is null."""
    if spec.get("path"):
        return Path(spec["path"])
    folder = tiny_lm_folder(spec.get("tiny"), cache_dir)
    opts = {**TINY_DEFAULTS, **dict(spec.get("tiny") or {})}
    return make_tiny_lm(folder, **opts)


def build_lm(spec: Mapping, cache_dir: str | os.PathLike | None = None) -> CausalLM:
    """The LM of a plain spec (see the module docstring)."""
    spec = dict(spec)
    kind = _check_kind(spec)
    if kind == "hf":
        return HFCausalLM(resolve_hf_path(spec, cache_dir or spec.get("cache_dir")))
    if kind == "stack":
        if not spec.get("stack"):
            raise InputError("lm.kind=stack needs lm.stack: the SequenceStack options (dim, depth, mixer, ...)")
        return StackLM(spec["stack"], int(spec.get("seed", 0)), spec.get("weights"))
    if not spec.get("width"):
        raise InputError("lm.kind=identity needs lm.width: the token width (the LM's hidden size it replaces)")
    return IdentityLM(int(spec["width"]))


def lm_identity(spec: Mapping, cache_dir: str | os.PathLike | None = None) -> str:
    """A string that changes when the LM's text embeddings may change (for caching them)."""
    spec = dict(spec)
    kind = _check_kind(spec)
    if kind == "hf":
        path = resolve_hf_path(spec, cache_dir or spec.get("cache_dir"))
        if not path.is_dir():
            build_lm(spec, cache_dir)  # raises the one-line error
        stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        return json.dumps(["hf", str(path.resolve()), stamps])
    if kind == "stack" and spec.get("weights") and Path(spec["weights"]).is_file():
        stat = Path(spec["weights"]).stat()
        spec["weights"] = [str(Path(spec["weights"]).resolve()), stat.st_size, stat.st_mtime_ns]
    return json.dumps([kind, spec], sort_keys=True, default=str)


# --------------------------------------------------------------------------- the forecaster
def segment_layer(n_in: int, n_out: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    """A linear layer (``layers=0``) or an MLP with ``layers`` hidden layers of width ``hidden``."""
    if layers <= 0:
        return nn.Linear(n_in, n_out)
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, n_out))


class AutoTimes(nn.Module):
    """The AutoTimes forecaster over ``[B, T, C]`` windows (channels are independent series).

    Args:
        lm: the LM spec (see the module docstring); its module is ``backbone``.
        token_len: the segment length ``S``.
        pred_len: the default horizon of :meth:`forward`.
        mlp_layers, mlp_hidden, dropout: the segment embedding and projection (0: linear).
        context: ``grow`` (each forecast segment extends the context: KV cache or recurrent
            state) or ``slide`` (the context keeps its length, dropping the oldest segment, as
            the reference code's rolling test).
        prompt_norm: how an in-context prompt is normalised: ``own`` (by its own statistics,
            the lookback by its own) or ``joint`` (prompt and lookback together, one mean and
            std for the whole input, as the reference code, which feeds the concatenation).
    """

    def __init__(self, lm: Mapping, token_len: int = 96, pred_len: int = 96, mlp_layers: int = 0,
                 mlp_hidden: int = 256, dropout: float = 0.0, context: str = "grow", prompt_norm: str = "own"):
        super().__init__()
        if context not in ("grow", "slide"):
            raise InputError(f"context='{context}': choose grow (KV cache / recurrent state) or slide")
        if prompt_norm not in ("own", "joint"):
            raise InputError(f"prompt_norm='{prompt_norm}': choose own (prompt and lookback each by their own "
                             "statistics) or joint (one mean and std over both)")
        self.prompt_norm = prompt_norm
        self.backbone = build_lm(lm)
        self.token_len, self.pred_len, self.context = int(token_len), int(pred_len), context
        width = self.backbone.width
        self.embed = segment_layer(self.token_len, width, mlp_hidden, mlp_layers, dropout)
        self.head = segment_layer(width, self.token_len, mlp_hidden, mlp_layers, dropout)
        self.pos_scale = nn.Parameter(torch.ones(()))

    # -- pieces
    @staticmethod
    def normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` -> ``(series [B*C, T], mean [B, 1, C], std [B, 1, C])``: each channel
        standardised by its own statistics over ``T``."""
        mean, std = lookback_stats(x)
        z = (x - mean) / std
        return z.permute(0, 2, 1).reshape(-1, x.shape[1]), mean, std

    def tokens(self, series: torch.Tensor, pos: torch.Tensor | None, n_channels: int) -> torch.Tensor:
        """``series [B*C, N*S]`` and ``pos [B, N, D]`` (or ``None``) -> tokens ``[B*C, N, D]``."""
        if series.shape[-1] % self.token_len:
            raise InputError(f"AutoTimes: a length of {series.shape[-1]} is not a multiple of "
                             f"token_len={self.token_len}")
        se = self.embed(series.unfold(-1, self.token_len, self.token_len))
        if pos is None or pos.shape[-1] == 0:
            return se
        if pos.shape[-1] != se.shape[-1]:
            raise InputError(f"AutoTimes: position embeddings of width {pos.shape[-1]} for an LM of width "
                             f"{se.shape[-1]}; data.timestamps.lm must be an LM of the same width")
        pos = pos.to(se.dtype).repeat_interleave(n_channels, dim=0)
        return F.normalize(se, dim=-1) + self.pos_scale * F.normalize(pos, dim=-1)

    @staticmethod
    def _to_windows(segments: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[B*C, T]`` normalised -> ``[B, T, C]`` in the input's scale."""
        b, _, c = mean.shape
        return (segments.reshape(b, c, -1).permute(0, 2, 1) * std + mean).contiguous()

    # -- training: next segment at every position
    def next_segments(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N*S, C]`` -> ``[B, N*S, C]``: segment ``i`` of the output forecasts segment
        ``i + 1`` of the input (teacher forcing)."""
        series, mean, std = self.normalise(x)
        hidden, _ = self.backbone(self.tokens(series, pos, x.shape[-1]))
        return self._to_windows(self.head(hidden).flatten(1), mean, std)

    # -- forecasting: autoregressive rollout
    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, future_pos: torch.Tensor | None = None,
                horizon: int | None = None, prompt: torch.Tensor | None = None,
                prompt_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast ``horizon`` steps: ``x [B, L, C]`` -> ``[B, horizon, C]``.

        ``pos [B, L/S, D]`` and ``future_pos [B, ceil(horizon/S), D]``: the segments' position
        embeddings (``None``: none). ``prompt [B, P*S, C]`` (with ``prompt_pos [B, P, D]``):
        segments put before the lookback (in-context forecasting), normalised by their own
        statistics or, with ``prompt_norm=joint``, together with the lookback.
        """
        if x.ndim != 3:
            raise InputError(f"AutoTimes expects x of shape [batch, time, channels], got {list(x.shape)}")
        horizon = int(horizon or self.pred_len)
        n_steps = -(-horizon // self.token_len)
        c = x.shape[-1]
        if future_pos is not None and n_steps > 1 and future_pos.shape[1] < n_steps - 1:
            raise InputError(f"AutoTimes: future_pos has {future_pos.shape[1]} segments; a horizon of {horizon} "
                             f"needs {n_steps - 1} (the forecast segments fed back)")
        if prompt is not None and self.prompt_norm == "joint":
            series, mean, std = self.normalise(torch.cat([prompt, x], dim=1))
            tokens = self.tokens(series, None if pos is None or prompt_pos is None
                                 else torch.cat([prompt_pos, pos], dim=1), c)
        else:
            series, mean, std = self.normalise(x)
            tokens = self.tokens(series, pos, c)
            if prompt is not None:
                tokens = torch.cat([self.tokens(self.normalise(prompt)[0], prompt_pos, c), tokens], dim=1)
        limit = self.backbone.max_tokens
        if limit and self.context == "grow" and tokens.shape[1] + n_steps - 1 > limit:
            raise InputError(f"AutoTimes: {tokens.shape[1]} context + {n_steps - 1} forecast tokens exceed the "
                             f"LM's {limit} positions; use context=slide or a shorter horizon")
        hidden, state = self.backbone(tokens, use_cache=self.context == "grow")
        segments = [self.head(hidden[:, -1])]
        for k in range(1, n_steps):
            step_pos = None if future_pos is None else future_pos[:, k - 1:k]
            new = self.tokens(segments[-1], step_pos, c)
            if self.context == "grow":
                hidden, state = self.backbone(new, state=state, use_cache=True)
            else:
                tokens = torch.cat([tokens[:, 1:], new], dim=1)
                hidden, _ = self.backbone(tokens)
            segments.append(self.head(hidden[:, -1]))
        return self._to_windows(torch.cat(segments, dim=-1)[:, :horizon], mean, std)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the task module
class AutoTimesModule(ForecastModule):
    """Train AutoTimes on next-segment MSE at every position; validate by rolling out
    ``pred_len``; test every horizon of the data module (one model) and, with a held-out
    series, zero-shot against in-context forecasting. Baselines: seasonal naive per horizon.

    With a frozen LM (``freeze=frozen_backbone``) its weights are left out of checkpoints and
    reloaded from ``lm`` (their source) when the checkpoint is loaded.
    """

    predictor = None

    def __init__(self, net: Mapping, optimizer: Mapping, scheduler: Mapping | None = None,
                 freeze: str = "frozen_backbone", baselines: Sequence[str] = ("seasonal_naive",),
                 seasonal_period: int = 24):
        super().__init__(net, optimizer, scheduler, freeze, regularizer=None, baselines=tuple(baselines),
                         seasonal_period=seasonal_period)
        self.lm_frozen = not any(p.requires_grad for p in self.net.backbone.parameters())
        self.strict_loading = not self.lm_frozen
        self.test_names: list[str] = []

    def training_step(self, batch, batch_idx):
        x, y, pos = batch
        loss = F.mse_loss(self.net.next_segments(x, pos), y)
        self._log_epoch("train/mse", loss, len(x), prog_bar=True)
        self._log_epoch("train/loss", loss, len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, pos, future_pos = batch
        self.val_metrics.update(self.net(x, pos, future_pos, horizon=y.shape[1])[..., -y.shape[-1]:], y)

    # -- test: every horizon (and the transfer rows), with baselines
    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.test_names = datamodule.test_loader_names()
        rows = [f"model_{n}" for n in self.test_names]
        if "seasonal_naive" in self.hparams.baselines and self.hparams.seasonal_period <= datamodule.seq_len:
            rows += [f"seasonal_naive_{n}" for n in self.test_names if not n.startswith("in_context")]
        self.test_rows = {}
        self.coefficient_report = {}
        self.test_metrics = nn.ModuleDict({f"{r}{s}": forecast_metrics() for r in rows for s in ("", "_orig")}
                                          ).to(self.device)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.test_names[dataloader_idx]
        x, y, pos, future_pos, *prompt = batch
        pred = self.net(x, pos, future_pos, horizon=y.shape[1], prompt=prompt[0] if prompt else None,
                        prompt_pos=prompt[1] if prompt else None)[..., -y.shape[-1]:]  # MS: the target
        transfer = name == "zero_shot" or name.startswith("in_context")
        preds = {f"model_{name}": pred}
        if f"seasonal_naive_{name}" in self.test_metrics:
            naive = SeasonalNaive(self.hparams.seasonal_period, y.shape[1], y.shape[-1])
            preds[f"seasonal_naive_{name}"] = naive(x)
        mean, std = self._target_scale(y)
        for key, p in preds.items():
            self.test_metrics[key].update(p, y)
            if not transfer:  # the held-out series has its own scale: no original units for it
                self.test_metrics[f"{key}_orig"].update(p * std + mean, y * std + mean)

    def on_test_epoch_end(self) -> None:
        for key in [k for k in self.test_metrics if k.endswith("_orig")]:
            if not self.test_metrics[key]["mse"].update_called:
                del self.test_metrics[key]
        super().on_test_epoch_end()

    def predict_step(self, batch, batch_idx):
        x, _, pos, future_pos = batch
        mean, std = self._target_scale(torch.zeros(1, 1, self.data_info["n_out"], device=x.device))
        return self.net(x, pos, future_pos)[..., -std.shape[-1]:] * std + mean

    # -- checkpoints: a frozen LM is reloaded from its source, not stored
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lm_frozen:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("net.backbone.")]:
                del state[key]
        checkpoint["seqapps"]["trainable_parameters"] = self.net.trainable_parameters()

    # -- export: the rollout needs timestamps and a cache; not exported as one ONNX graph
    def export_module(self) -> nn.Module:
        raise InputError("AutoTimes is not exported to ONNX (its rollout takes timestamp embeddings and "
                         "a KV cache); use the checkpoint: seqapps.runs.load_module(<ckpt>).net")

    # -- plots
    @torch.no_grad()
    def make_plots(self, datamodule, folder: str | Path) -> list[Path]:
        horizon = max(datamodule.test_horizons)
        ds = datamodule.windows("test", horizon)
        x, y, pos, future_pos = (t[None] for t in ds[len(ds) - 1])
        net = self.net.eval().cpu()
        pred = net(x, pos, future_pos, horizon=horizon)[0].numpy()
        info = self.data_info
        mean, std = np.asarray(info["mean"]), np.asarray(info["std"])
        history, truth, pred = (a * std + mean for a in (x[0].numpy(), y[0].numpy(), pred))
        fig, ax = plotting.new_figure()
        t_hist, t_future = np.arange(-len(history), 0), np.arange(horizon)
        ax.plot(t_hist, history[:, -1], color="0.3", label="history")
        ax.plot(t_future, truth[:, -1], color="tab:green", label="truth")
        ax.plot(t_future, pred[:, -1], color="tab:red", linestyle="--", label="forecast (rolled out)")
        for k in range(1, -(-horizon // net.token_len)):
            ax.axvline(k * net.token_len, color="0.85", linewidth=0.6)
        ax.axvline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel("steps from the forecast origin (segment boundaries marked)")
        ax.set_ylabel(info["target"])
        ax.set_title(f"AutoTimes ({type(net.backbone).__name__}) on {info['source']}: last test window")
        ax.legend(loc="upper left")
        return [plotting.save(fig, Path(folder) / "forecast.png")]
