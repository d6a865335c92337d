"""Chimera (Behrouz, Santacatterina & Zabih, 2024, "Chimera: Effectively Modeling Multivariate
Time Series with 2-Dimensional State Space Models") as a time-series model: multivariate
forecasting here, classification in ``seqapps.tasks.classification.series``, anomaly scores as
reconstruction error (:class:`ChimeraReconstructor`).

The model: every variate's series is embedded on its own (a shared linear map of each value, or
of each patch of ``patch_len`` values, plus a learned embedding of the variate), which lays the
window out as a grid ``[B, V, P, D]`` of variates × time steps (``P = ceil(T / patch_len)``).
Stacked residual blocks whose mixer is Chimera's 2-D selective SSM
(``seqapps.backbones.mixers.chimera``; pre-norm, mixer, SwiGLU) sweep that grid: along time
(causal) and along the variates (both directions by default), with two coupled states per cell.
Heads read the grid: a flatten-linear forecast of ``pred_len`` steps per variate (as PatchTST's
and the Time-Series-Library's heads), a mean-pooled classifier, a per-token reconstruction.

The ablation of the cross-variate path is the same model with ``cross_variate=False`` in the
mixer (``backbone.mixer.cross_variate=false``): no state crosses between variates, so each
variate is forecast (or embedded) from its own history alone, by the same weights.

Any seqapps 1-D stack can replace the 2-D one: with ``layout="grid"`` a 1-D mixer then runs on
each variate separately (channel independence); with ``layout="channels"`` all variates of a time
step (or patch) are embedded into one token and the stack mixes ``[B, P, D]``.

The paper's two 2-D SSM heads (long-term progression and seasonal patterns, with different
discretisations along time) are the mixer's ``heads`` option; its closed-loop decoder for long
horizons is ``ChimeraForecaster(decoder="closed_loop")``. Left out: an explicit trend/seasonal
decomposition of the input ahead of the two heads (the paper's method section was not available
to us; each head reads the same input, and their sum passes one shared gate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.stack import SequenceStack
from seqapps.errors import InputError
from seqapps.tasks.forecasting.revin import RevIN

LAYOUTS = ("auto", "grid", "channels")
DECODERS = ("linear", "closed_loop")


def chimera_stack(dim: int = 32, depth: int = 2, cross_variate: bool = True, **mixer: Any) -> SequenceStack:
    """A :class:`SequenceStack` of Chimera blocks (the default backbone of the models here)."""
    return SequenceStack(dim, depth, mixer={"name": "chimera", "cross_variate": cross_variate, **mixer})


def build_backbone(backbone: nn.Module | Mapping | None) -> nn.Module:
    """A built stack, a mapping of :func:`chimera_stack` arguments, or None (the default)."""
    if backbone is None:
        return chimera_stack()
    if isinstance(backbone, Mapping):
        return chimera_stack(**backbone)
    if not hasattr(backbone, "dim"):
        raise InputError(f"backbone: expected a seqapps stack (with .dim), got {type(backbone).__name__}")
    return backbone


class SeriesEncoder(nn.Module):
    """A multivariate window ``x [B, T, V]`` -> tokens, through a stack.

    ``layout="grid"``: per-variate tokens ``[B, V, P, D]``; a grid-native stack (Chimera) sweeps
    the grid, a 1-D stack runs on each variate's row. ``layout="channels"``: one token per time
    step (or patch) for all variates, ``[B, P, D]``. ``auto``: grid for grid-native stacks,
    channels otherwise. Series shorter than a multiple of ``patch_len`` are left-padded with
    their first value.
    """

    def __init__(self, num_variates: int, backbone: nn.Module | Mapping | None = None, patch_len: int = 1,
                 layout: str = "auto", dropout: float = 0.0):
        super().__init__()
        if layout not in LAYOUTS:
            raise InputError(f"layout='{layout}' is not one of {', '.join(LAYOUTS)}")
        if num_variates < 1 or patch_len < 1:
            raise InputError(f"num_variates={num_variates}, patch_len={patch_len}: both must be >= 1")
        self.backbone = build_backbone(backbone)
        self.num_variates, self.patch_len, self.dim = num_variates, patch_len, self.backbone.dim
        grid_native = bool(getattr(self.backbone, "grid_native", False))
        self.layout = ("grid" if grid_native else "channels") if layout == "auto" else layout
        if self.layout == "channels" and grid_native:
            raise InputError("layout='channels' gives a 1-D sequence; a grid-native mixer (Chimera) needs layout='grid'")
        if self.layout == "grid":
            self.value_embedding = nn.Linear(patch_len, self.dim)
            self.variate_embedding = nn.Parameter(torch.randn(num_variates, self.dim) * 0.02)
        else:
            self.value_embedding = nn.Linear(patch_len * num_variates, self.dim)
            self.variate_embedding = None
        self.dropout = nn.Dropout(dropout)

    def num_tokens(self, seq_len: int) -> int:
        """``P``, the number of time tokens of a window of ``seq_len`` steps."""
        return math.ceil(seq_len / self.patch_len)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> ``[B, V, P, patch_len]`` (left-padded with the first value)."""
        if x.ndim != 3 or x.shape[-1] != self.num_variates:
            raise InputError(f"expected a window of shape [batch, time, {self.num_variates} variates], "
                             f"got {list(x.shape)}")
        pad = -x.shape[1] % self.patch_len
        if pad:
            x = torch.cat([x[:, :1].expand(-1, pad, -1), x], 1)
        return x.transpose(1, 2).unflatten(2, (-1, self.patch_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> ``[B, V, P, D]`` (grid) or ``[B, P, D]`` (channels)."""
        return self.mix(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> the input tokens, ``[B, V, P, D]`` (grid) or ``[B, P, D]`` (channels)."""
        return self.embed_patches(self.patches(x))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches [B, V, P, patch_len]`` -> tokens ``[B, V, P, D]`` (grid) or ``[B, P, D]`` (channels)."""
        if self.layout == "channels":
            return self.dropout(self.value_embedding(patches.permute(0, 2, 1, 3).flatten(2)))  # [B, P, V * patch] -> [B, P, D]
        return self.dropout(self.value_embedding(patches) + self.variate_embedding[:, None])  # [B, V, P, D]

    def mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """The stack over the tokens of :meth:`embed` (same shape out)."""
        return self.mix_on(tokens)[0]

    def mix_on(self, tokens: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """The stack over ``tokens`` from ``state`` (``None``: the start) -> ``(tokens, state after
        them)``: tokens given piece by piece along time, each from the state the last one left,
        give what the whole gives (every stack is causal in time)."""
        run = self.backbone if state is None else lambda t: self.backbone(t, state)  # any stack takes no state
        if self.layout == "channels" or getattr(self.backbone, "grid_native", False):
            return run(tokens)
        b, v, p, d = tokens.shape  # a 1-D stack: each variate its own sequence
        out, state = run(tokens.reshape(b * v, p, d))
        return out.view(b, v, p, d), state

    def carries_state(self) -> bool:
        """Whether the stack hands on a state along time (what feeding tokens back needs)."""
        init_state = getattr(self.backbone, "init_state", None)
        return init_state is not None and len(init_state(1, device="meta")) > 0


class ChimeraForecaster(nn.Module):
    """Chimera for forecasting: ``x [B, seq_len, n_in] -> [B, pred_len, n_out]``.

    ``n_out == n_in`` (features ``M``/``S``) forecasts every variate; ``n_out == 1`` (``MS``) the
    last one (the target), from the grid of all of them.

    Decoders. ``decoder="linear"`` (default) reads the whole grid at once: a flatten-linear map to
    ``pred_len`` steps. ``decoder="closed_loop"`` is the paper's closed loop for long horizons:
    a head maps the last time token to the next patch of every variate, that patch is embedded
    and fed back through the stack from the state the lookback left, and so on until
    ``pred_len`` steps are out: the forecast is a rollout of the model on its own outputs, at
    constant memory per step. :meth:`forecast` rolls out any horizon from the same model.
    Training (:meth:`training_loss`): with ``teacher_forcing`` (default) the true future patches
    are fed instead of the forecast ones, so the whole horizon is one parallel pass over
    ``seq_len + pred_len`` steps (as an autoregressive LM trains); without it, through the
    rollout itself (what test time does; ``pred_len / patch_len`` sequential passes). Both cost
    about the same on a CPU (the 2-D sweep grows with the time tokens); on the weather data at
    ``pred_len`` 96, teacher forcing trained the better model.

    Args:
        backbone: the stack (default: two Chimera blocks of width 32); see :class:`SeriesEncoder`.
        patch_len: time steps per token (1: one grid cell per observation, as the paper).
        revin: normalise each window by its own statistics and undo it on the forecast.
        layout, dropout: as :class:`SeriesEncoder`.
        decoder: ``linear`` or ``closed_loop`` (above).
        teacher_forcing: how the closed loop trains (above); ignored by the linear decoder. It
            needs every variate's future (features S or M): with MS, set it to false.
    """

    def __init__(self, seq_len: int, pred_len: int, n_in: int, n_out: int | None = None,
                 backbone: nn.Module | Mapping | None = None, patch_len: int = 1, revin: bool = True,
                 layout: str = "auto", dropout: float = 0.0, decoder: str = "linear", teacher_forcing: bool = True):
        super().__init__()
        n_out = n_in if n_out is None else n_out
        if n_out not in (1, n_in):
            raise InputError(f"ChimeraForecaster: n_out={n_out} with n_in={n_in}; n_out must be 1 (MS) or n_in (S, M)")
        if decoder not in DECODERS:
            raise InputError(f"ChimeraForecaster: decoder='{decoder}' is not one of {', '.join(DECODERS)}")
        if seq_len < 1 or pred_len < 1:
            raise InputError(f"ChimeraForecaster: seq_len={seq_len}, pred_len={pred_len}; both must be >= 1")
        if decoder == "closed_loop" and teacher_forcing and n_out != n_in:
            raise InputError("ChimeraForecaster: teacher forcing feeds every variate's true future, but features MS "
                             "gives only the target's; set teacher_forcing=false (train through the rollout)")
        self.seq_len, self.pred_len, self.n_in, self.n_out, self.decoder = seq_len, pred_len, n_in, n_out, decoder
        self.teacher_forcing = teacher_forcing
        self.encoder = SeriesEncoder(n_in, backbone, patch_len, layout, dropout)
        if decoder == "closed_loop" and not self.encoder.carries_state():
            raise InputError(f"ChimeraForecaster: decoder='closed_loop' feeds each forecast back from the state the "
                             f"lookback left, and this backbone ({type(self.encoder.backbone).__name__}) carries "
                             "none along time; use a SequenceStack of causal mixers or decoder='linear'")
        self.revin = RevIN() if revin else None
        per_token = self.encoder.layout == "grid"
        if decoder == "closed_loop":  # a token -> the next patch: of its variate (grid) or of all (channels)
            self.head = nn.Linear(self.encoder.dim, patch_len if per_token else patch_len * n_in)
        else:
            flat = self.encoder.num_tokens(seq_len) * self.encoder.dim
            self.head = nn.Linear(flat, pred_len if per_token else pred_len * n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, seq_len, n_in]`` -> ``[B, pred_len, n_out]``."""
        return self.forecast(x, self.pred_len)

    def forecast(self, x: torch.Tensor, horizon: int) -> torch.Tensor:
        """``x [B, seq_len, n_in]`` -> ``[B, horizon, n_out]``; a horizon other than ``pred_len``
        needs the closed-loop decoder."""
        if x.ndim != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.n_in:
            raise InputError(f"ChimeraForecaster expects x of shape [batch, {self.seq_len}, {self.n_in}], "
                             f"got {list(x.shape)}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise InputError(f"ChimeraForecaster: horizon={horizon!r}; give a whole number of steps >= 1")
        if horizon != self.pred_len and self.decoder != "closed_loop":
            raise InputError(f"ChimeraForecaster: a horizon of {horizon} steps from a model trained for "
                             f"{self.pred_len} needs decoder='closed_loop'")
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        if self.decoder == "closed_loop":
            y = self._roll_out(x, horizon)[..., -self.n_out:]
        elif self.encoder.layout == "grid":
            y = self.head(self.encoder(x).flatten(2)).transpose(1, 2)[..., -self.n_out:].contiguous()  # [B, V, P*D] -> [B, pred_len, n_out]
        else:
            y = self.head(self.encoder(x).flatten(1)).view(-1, self.pred_len, self.n_out)
        return y if stats is None else self.revin.denormalize(y, stats)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The MSE of the forecast of ``x [B, seq_len, n_in]`` against ``y [B, pred_len, n_out]``;
        the closed loop with teacher forcing feeds ``y``'s own patches."""
        if self.decoder != "closed_loop" or not self.teacher_forcing:
            return F.mse_loss(self(x), y)
        p = self.encoder.patch_len
        steps = math.ceil(self.pred_len / p)
        stats = None
        future = y
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
            future = self.revin.apply_stats(y, stats)
        fed = future[:, :(steps - 1) * p]  # every future patch but the last is an input
        hidden = self.encoder(torch.cat([x, fed], 1))  # the lookback's patches as in forecast(), then the fed ones
        forecast = self._as_steps(self._next_patches(hidden[..., -steps:, :]), self.pred_len)  # [B, pred_len, V]
        if stats is not None:
            forecast = self.revin.denormalize(forecast, stats)
        return F.mse_loss(forecast, y)

    def _roll_out(self, x: torch.Tensor, horizon: int) -> torch.Tensor:
        """The closed loop: ``x [B, seq_len, V]`` (normalised) -> ``[B, horizon, V]``."""
        p = self.encoder.patch_len
        hidden, state = self.encoder.mix_on(self.encoder.embed(x))
        patches = []
        for step in range(math.ceil(horizon / p)):
            patch = self._next_patches(hidden[..., -1:, :])  # from the last time token: [B, V, 1, p]
            patches.append(patch)
            if (step + 1) * p < horizon:  # feed it back, one time column of tokens
                hidden, state = self.encoder.mix_on(self.encoder.embed_patches(patch), state)
        return self._as_steps(torch.cat(patches, 2), horizon)

    def _next_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The closed loop's head: time tokens ``[B, V, S, D]`` (grid) or ``[B, S, D]`` (channels)
        -> the patch after each, for every variate, ``[B, V, S, patch_len]``."""
        patches = self.head(tokens)  # [B, V, S, p] (grid) or [B, S, V * p] (channels)
        if self.encoder.layout == "grid":
            return patches
        return patches.unflatten(-1, (self.n_in, self.encoder.patch_len)).transpose(1, 2)

    @staticmethod
    def _as_steps(patches: torch.Tensor, horizon: int) -> torch.Tensor:
        """``[B, V, S, p]`` consecutive patches -> the first ``horizon`` steps, ``[B, horizon, V]``."""
        return patches.flatten(2)[..., :horizon].transpose(1, 2)


class ChimeraReconstructor(nn.Module):
    """Chimera for anomaly scores by reconstruction (the Time-Series-Library's protocol: train
    to reconstruct normal windows; the score of a step is its squared reconstruction error).

    ``forward(x [B, T, V]) -> x̂ [B, T, V]``; :meth:`anomaly_score` ``-> [B, T]`` (mean over the
    variates of ``(x - x̂)²``). ``revin`` as :class:`ChimeraForecaster`.

    ``mask_ratio = 0`` is plain autoencoding: every grid cell sees its own values, so only a width
    ``D`` below ``patch_len`` keeps the model from copying them. ``mask_ratio > 0`` is masked
    reconstruction: in training a random share ``mask_ratio`` of the grid cells (one variate ×
    one patch) have their token replaced by a learned mask token, and the loss is the error on
    those cells; for scores, ``K = max(2, round(1 / mask_ratio))`` passes mask the cells with
    ``(variate + patch) % K == k``, so that every cell is reconstructed once without its own
    values: from its variate's past (the scan is causal in time) and, through the cross-variate
    path, from the other variates, which is what lets a broken relation between variates show.
    """

    def __init__(self, n_in: int, backbone: nn.Module | Mapping | None = None, patch_len: int = 1,
                 revin: bool = True, dropout: float = 0.0, mask_ratio: float = 0.0):
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise InputError(f"mask_ratio={mask_ratio}: must be in [0, 1) (0: plain autoencoding)")
        self.n_in, self.mask_ratio = n_in, float(mask_ratio)
        self.encoder = SeriesEncoder(n_in, backbone, patch_len, "grid", dropout)
        self.revin = RevIN() if revin else None
        self.head = nn.Linear(self.encoder.dim, patch_len)
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.dim)) if mask_ratio > 0 else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, V]`` -> ``x̂ [B, T, V]``; ``mask [B, V, P]`` (bool): the grid cells whose
        token is the mask token (needs ``mask_ratio > 0``)."""
        t = x.shape[1] if x.ndim == 3 else 0
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        tokens = self.encoder.embed(x)  # [B, V, P, D]
        if mask is not None:
            if self.mask_token is None:
                raise InputError("a mask needs a ChimeraReconstructor built with mask_ratio > 0")
            masked = self.mask_token + self.encoder.variate_embedding[:, None]  # [V, 1, D]: where the cell is, not what
            tokens = torch.where(mask[..., None], masked, tokens)
        tokens = self.encoder.mix(tokens)
        recon = self.head(tokens).flatten(2)[..., -t:].transpose(1, 2).contiguous()  # [B, V, P*patch] -> [B, T, V], the last T steps
        return recon if stats is None else self.revin.denormalize(recon, stats)

    def _steps(self, mask: torch.Tensor, t: int) -> torch.Tensor:
        """A cell mask ``[B, V, P]`` -> the steps it covers, ``[B, T, V]`` (left padding dropped)."""
        return mask.repeat_interleave(self.encoder.patch_len, -1)[..., -t:].transpose(1, 2)

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction MSE of a batch ``x [B, T, V]``: on every step (``mask_ratio = 0``) or
        on the randomly masked cells."""
        if self.mask_token is None:
            return (self(x) - x).pow(2).mean()
        b, t, v = x.shape
        mask = torch.rand(b, v, self.encoder.num_tokens(t), device=x.device) < self.mask_ratio
        steps = self._steps(mask, t).to(x.dtype)
        return ((self(x, mask) - x).pow(2) * steps).sum() / steps.sum().clamp_min(1.0)

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> ``(x - x̂)² [B, T, V]``; with ``mask_ratio > 0``, each cell's error
        from the pass that masks it (class docstring)."""
        if self.mask_token is None:
            return (x - self(x)).pow(2)
        b, t, v = x.shape
        passes = max(2, round(1 / self.mask_ratio))
        cells = torch.arange(v, device=x.device)[:, None] + torch.arange(self.encoder.num_tokens(t), device=x.device)
        # the K passes as one batch of K·B windows: pass k masks the cells with (variate + patch) % K == k
        masks = (cells % passes == torch.arange(passes, device=x.device)[:, None, None])  # [K, V, P]
        masks = masks[:, None].expand(-1, b, -1, -1).flatten(0, 1)  # [K·B, V, P]
        recon = self(x.repeat(passes, 1, 1), masks).unflatten(0, (passes, b))  # [K, B, T, V]
        steps = self._steps(masks, t).unflatten(0, (passes, b))  # each step in exactly one pass
        return ((x - recon).pow(2) * steps).sum(0)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, V]`` -> ``[B, T]``, the squared reconstruction error averaged over variates."""
        return self.reconstruction_error(x).mean(-1)
