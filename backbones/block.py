"""The residual block around a mixer, and the pieces it is made of.

::

    x = x + drop_path(mixer(norm_1(x)))
    x = x + drop_path(ffn(norm_2(x)))        # ffn: MLP, GLU (SwiGLU) or none

A block has the streaming interface of a mixer (``forward(x, state) -> (y, state)``,
``init_state``, ``step``); its state is the mixer's. Norms and the feed-forward act on the last
axis only, so a block around a grid-native mixer takes ``[B, *grid, C]`` as the mixer does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqapps.backbones.mixer import build_mixer
from seqapps.errors import InputError

#: How a mixer is named: ``"gla"``; ``{"name": "gla", "num_heads": 4}`` (the shape of
#: ``conf/backbone/mixer/<name>.yaml``); or a callable ``f(dim, **kwargs) -> module`` (a Mixer
#: class that need not be registered, or a factory).
MixerSpec = Union[str, Mapping, Callable[..., nn.Module]]

NORMS = ("rmsnorm", "layernorm")
FFNS = ("glu", "mlp", "none")


def mixer_name(spec: MixerSpec) -> str:
    """The name a spec refers to (a class's ``name``, or its Python name for a callable)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise InputError(f"a mixer given as a mapping needs a 'name' key, got keys {sorted(spec)}")
        return str(spec["name"])
    if callable(spec):
        return getattr(spec, "name", "") or getattr(spec, "__name__", type(spec).__name__)
    raise InputError(f"a mixer is a name, a mapping with 'name', or a callable; got {type(spec).__name__}")


def build_mixer_from_spec(spec: MixerSpec, dim: int, **kwargs: Any) -> nn.Module:
    """Build the mixer ``spec`` names at width ``dim``; ``kwargs`` add to (and override) the
    spec's own keyword arguments."""
    if isinstance(spec, str):
        return build_mixer(spec, dim, **kwargs)
    if isinstance(spec, Mapping):
        options = {str(k): v for k, v in spec.items() if k != "name"}
        return build_mixer(mixer_name(spec), dim, **{**options, **kwargs})
    if isinstance(spec, nn.Module):
        raise InputError(f"give the mixer as a name, a mapping with 'name', or a class/factory, not a built "
                         f"{type(spec).__name__} (each layer builds its own)")
    if callable(spec):
        return spec(dim, **kwargs)
    raise InputError(f"a mixer is a name, a mapping with 'name', or a callable; got {type(spec).__name__}")


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"rmsnorm"`` or ``"layernorm"`` over the last axis."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise InputError(f"unknown norm '{kind}'; available: {', '.join(NORMS)}")


class MLP(nn.Module):
    """``fc_2(gelu(fc_1(x)))``, hidden width ``ratio * dim`` (the Transformer feed-forward)."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, round(ratio * dim))
        self.fc_in, self.fc_out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.dropout(F.gelu(self.fc_in(x)))))


class GLU(nn.Module):
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``. The hidden width is ``2/3`` of
    ``ratio * dim`` (rounded up to a multiple of 8), which keeps the parameter count of an MLP
    of the same ratio."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = 8 * max(1, -(-round(2 * ratio * dim / 3) // 8))
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(self.dropout(F.silu(gate) * up)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, zero a residual branch for a random
    ``rate`` of the samples and scale the others by ``1 / (1 - rate)``; the identity in eval."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise InputError(f"drop_path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def make_ffn(kind: str, dim: int, ratio: float, dropout: float) -> nn.Module | None:
    if kind == "glu":
        return GLU(dim, ratio, dropout)
    if kind == "mlp":
        return MLP(dim, ratio, dropout)
    if kind in ("none", None):
        return None
    raise InputError(f"unknown ffn '{kind}'; available: {', '.join(FFNS)}")


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``.

    Args:
        dim: width ``C``.
        mixer: a :data:`MixerSpec` (``"gla"``, ``{"name": "gla", ...}``, or a callable).
        mixer_kwargs: extra keyword arguments for the mixer.
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        ffn: ``"glu"`` (SwiGLU), ``"mlp"`` (GELU MLP) or ``"none"`` (Mamba-style blocks).
        mlp_ratio: hidden width of the feed-forward over ``dim``.
        drop_path: stochastic-depth rate of both residual branches (training only).
        dropout: dropout inside the feed-forward.
        wrap_mixer: optional ``f(factory) -> module`` that wraps the mixer, given a zero-argument
            factory that builds it (e.g. ``partial(GridScan, orders="hilbert")`` to scan a grid).

    ``forward(x [B, T, C], state=None) -> (y [B, T, C], state)`` (``[B, *grid, C]`` for a
    grid-native mixer); ``step(x_t [B, C], state) -> (y_t [B, C], state)``; the state is the
    mixer's.
    """

    def __init__(self, dim: int, mixer: MixerSpec = "gla", mixer_kwargs: Mapping | None = None,
                 norm: str = "rmsnorm", ffn: str = "glu", mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 dropout: float = 0.0, norm_eps: float = 1e-5,
                 wrap_mixer: Callable[[Callable[[], nn.Module]], nn.Module] | None = None):
        super().__init__()
        self.dim = dim
        self.mixer_norm = make_norm(norm, dim, norm_eps)
        options = dict(mixer_kwargs or {})

        def factory() -> nn.Module:
            return build_mixer_from_spec(mixer, dim, **options)

        self.mixer = factory() if wrap_mixer is None else wrap_mixer(factory)
        self.ffn = make_ffn(ffn, dim, mlp_ratio, dropout)
        self.ffn_norm = make_norm(norm, dim, norm_eps) if self.ffn is not None else None
        self.drop_path = DropPath(drop_path)

    @property
    def grid_native(self) -> bool:
        """Whether the mixer takes ``[B, *grid, C]`` itself (LightNet, Chimera)."""
        return bool(getattr(self.mixer, "grid_native", False))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn is None:
            return x
        return x + self.drop_path(self.ffn(self.ffn_norm(x)))

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        mixed, state = self.mixer(self.mixer_norm(x), state)
        return self._feed_forward(x + self.drop_path(mixed)), state

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        if not hasattr(self.mixer, "step"):
            raise InputError(f"{type(self.mixer).__name__} mixes whole inputs and cannot stream token by token; "
                             "stream a block around a causal mixer")
        mixed, state = self.mixer.step(self.mixer_norm(x_t), state)
        return self._feed_forward(x_t + self.drop_path(mixed)), state

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple:
        return self.mixer.init_state(batch_size, device=device, dtype=dtype)
