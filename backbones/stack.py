"""A stack of residual blocks: the embedding-free backbone for 1-D sequences ``[B, T, C]``.

The layers may use different mixers (hybrids: ``mixer=["gla", "attention"]`` alternates them).
For streaming, the per-layer states are flattened into one tuple of tensors (what
``torch.export`` and ONNX take as explicit inputs and outputs); :meth:`SequenceStack.split_state`
and :meth:`SequenceStack.join_state` go between that tuple and the per-layer tuples.
Forward over a whole sequence, forward over pieces with the state carried, and ``step`` token by
token give the same outputs (in eval mode: drop-path is random in training).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqapps.backbones.block import Block, MixerSpec, make_norm, mixer_name
from seqapps.backbones.mixer import available_mixers, mixer_class
from seqapps.errors import InputError

State = tuple[torch.Tensor, ...]


def layer_mixers(mixer: MixerSpec | Sequence[MixerSpec], depth: int) -> list[MixerSpec]:
    """One mixer spec per layer: a single spec for every layer, or a list that is repeated
    (``["gla", "attention"]`` over 4 layers: gla, attention, gla, attention)."""
    if depth < 1:
        raise InputError(f"a stack needs depth >= 1, got {depth}")
    if isinstance(mixer, (str, Mapping)) or callable(mixer):
        return [mixer] * depth
    specs = list(mixer)
    if not specs or depth % len(specs):
        raise InputError(f"a list of {len(specs)} mixers must repeat evenly over depth={depth} layers "
                         f"(give a list whose length divides the depth), got {[mixer_name(s) for s in specs]}")
    return specs * (depth // len(specs))


def layer_kwargs(specs: Sequence[MixerSpec], mixer_kwargs: Mapping | None) -> list[dict[str, Any]]:
    """Split ``mixer_kwargs`` into each layer's keyword arguments: an entry whose key names a
    mixer (of this stack or any registered one) and whose value is a mapping goes to that mixer
    only (``{"gla": {"num_heads": 2}, "chimera": {"d_state": 4}}``: a config may carry options
    for a mixer it does not use at the moment); every other entry goes to all."""
    names = {mixer_name(s) for s in specs} | set(available_mixers())
    options = dict(mixer_kwargs or {})
    per_name = {k: dict(v) for k, v in options.items() if k in names and isinstance(v, Mapping)}
    shared = {k: v for k, v in options.items() if k not in per_name}
    return [{**shared, **per_name.get(mixer_name(s), {})} for s in specs]


def accepted_kwargs(spec: MixerSpec, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that the mixer ``spec`` builds with: those whose names its
    constructor (a registered class's ``__init__``, or the callable itself) declares as
    parameters (a ``**kwargs`` catch-all takes none of them)."""
    target = mixer_class(mixer_name(spec)) if isinstance(spec, (str, Mapping)) else spec
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable: offer nothing
        return {}
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in named}


def position_kwargs(specs: Sequence[MixerSpec], kwargs: Sequence[Mapping[str, Any]],
                    context: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each layer's keyword arguments with what the stack knows of the layer added, for the
    mixers that take it: ``layer_idx`` (0-based) and ``num_layers`` (RWKV-6's layer-dependent
    initialisation, say) and the entries of ``context`` (e.g. the grid geometry an image
    backbone offers). Explicit ``kwargs`` win over both; both win over a spec's own options
    (``conf/backbone/mixer/<name>.yaml``)."""
    layers = []
    for i, (spec, own) in enumerate(zip(specs, kwargs)):
        offered = {**dict(context or {}), "layer_idx": i, "num_layers": len(specs)}
        layers.append({**accepted_kwargs(spec, offered), **own})
    return layers


class SequenceStack(nn.Module):
    """``depth`` residual :class:`Block` s and a final norm (no embedding, no head).

    Args:
        dim: width ``C``.
        depth: number of blocks.
        mixer: a mixer spec (``"gla"``, ``{"name": "gla", ...}`` as in
            ``conf/backbone/mixer/*.yaml``, a callable) or a list of them for a hybrid.
        mixer_kwargs: extra mixer arguments (see :func:`layer_kwargs` for hybrids).
        mixer_context: keyword arguments offered to every mixer whose constructor takes them
            (see :func:`position_kwargs`); ``layer_idx`` and ``num_layers`` are always offered.
        norm, ffn, mlp_ratio, dropout: as in :class:`Block`.
        drop_path: the largest stochastic-depth rate; layer ``i`` gets ``drop_path * i / (depth - 1)``.
        final_norm: end with a norm (pre-norm stacks need one).
        wrap_mixer: optional ``f(factory) -> module`` applied to each layer's mixer factory
            (e.g. ``functools.partial(GridScan, orders="hilbert")`` to scan a grid).

    ``forward(x [B, T, C], state=None) -> (y [B, T, C], state)``; ``step(x_t [B, C], state)``;
    ``init_state(batch_size)``; ``state`` is the flat tuple of every layer's tensors.
    """

    def __init__(self, dim: int, depth: int = 2, mixer: MixerSpec | Sequence[MixerSpec] = "gla",
                 mixer_kwargs: Mapping | None = None, norm: str = "rmsnorm", ffn: str = "glu",
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, dropout: float = 0.0, final_norm: bool = True,
                 norm_eps: float = 1e-5, wrap_mixer: Callable[[Callable[[], nn.Module]], nn.Module] | None = None,
                 mixer_context: Mapping[str, Any] | None = None):
        super().__init__()
        self.dim, self.depth = dim, depth
        specs = layer_mixers(mixer, depth)
        self.mixer_names = [mixer_name(s) for s in specs]
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList([
            Block(dim, spec, kwargs, norm=norm, ffn=ffn, mlp_ratio=mlp_ratio, drop_path=rate, dropout=dropout,
                  norm_eps=norm_eps, wrap_mixer=wrap_mixer)
            for spec, kwargs, rate in zip(specs, position_kwargs(specs, layer_kwargs(specs, mixer_kwargs),
                                                                 mixer_context), rates)])
        self.norm = make_norm(norm, dim, norm_eps) if final_norm else nn.Identity()
        self.state_sizes = tuple(len(block.init_state(1, device="meta")) for block in self.blocks)
        self.grad_checkpointing = False

    @property
    def grid_native(self) -> bool:
        """Whether every layer takes ``[B, *grid, C]`` itself."""
        return all(block.grid_native for block in self.blocks)

    # -- the state: one flat tuple of tensors <-> one tuple per layer
    def split_state(self, state: Sequence[torch.Tensor]) -> list[State]:
        """The flat state -> one tuple per layer."""
        if not isinstance(state, (tuple, list)) or len(state) != sum(self.state_sizes):
            got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
            raise InputError(f"SequenceStack: state must be a tuple of {sum(self.state_sizes)} tensors "
                             f"(from init_state; per layer {list(self.state_sizes)}), got {got}")
        layers, start = [], 0
        for size in self.state_sizes:
            layers.append(tuple(state[start:start + size]))
            start += size
        return layers

    @staticmethod
    def join_state(layer_states: Sequence[Sequence[torch.Tensor]]) -> State:
        """One tuple per layer -> the flat state."""
        return tuple(t for layer in layer_states for t in layer)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.join_state([block.init_state(batch_size, device=device, dtype=dtype) for block in self.blocks])

    def _check_channels(self, x: torch.Tensor, ndim: int) -> None:
        if x.ndim < ndim or x.shape[-1] != self.dim:
            layout = "[batch, time, channels]" if ndim == 3 else "[batch, channels]"
            raise InputError(f"SequenceStack expects x of shape {layout} with {self.dim} channels, got {list(x.shape)}")

    def forward(self, x: torch.Tensor, state: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (``[B, *grid, C]`` for grid-native or scanned layers) -> ``(y, state)``."""
        self._check_channels(x, 3)
        layer_states = [None] * self.depth if state is None else self.split_state(state)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, layer_state = checkpoint(block, x, layer_state, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state)
            new_states.append(layer_state)
        return self.norm(x), self.join_state(new_states)

    def step(self, x_t: torch.Tensor, state: Sequence[torch.Tensor]) -> tuple[torch.Tensor, State]:
        """One token ``x_t [B, C]`` -> ``(y_t [B, C], state)``."""
        self._check_channels(x_t, 2)
        new_states = []
        for block, layer_state in zip(self.blocks, self.split_state(state)):
            x_t, layer_state = block.step(x_t, layer_state)
            new_states.append(layer_state)
        return self.norm(x_t), self.join_state(new_states)
