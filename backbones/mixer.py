"""The one interface every token mixer follows, and the registry that finds them by name.

A mixer mixes information along the token axis::

    y, state = mixer(x, state=None)          # x [B, T, C] -> y [B, T, C]
    state = mixer.init_state(batch_size, device=..., dtype=...)
    y_t, state = mixer.step(x_t, state)      # x_t [B, C]: one token, O(1) memory in T

``state`` is a tuple of tensors (export-friendly: ONNX and ``torch.export`` see plain tensor
inputs and outputs). ``forward`` over a whole sequence, ``forward`` over pieces with the
state carried, and ``step`` token by token give the same outputs.

Adding a mixer is one new file in ``backbones/mixers/`` whose class is decorated with
``@register_mixer("name")``, and one ``conf/backbone/mixer/<name>.yaml``: the registry imports
every module of that folder the first time a name is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from seqapps.errors import InputError

State = tuple[torch.Tensor, ...]
_REGISTRY: dict[str, type[Mixer]] = {}


class Mixer(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses implement ``forward``, ``step`` and ``init_state``.

    ``dim`` is the model width ``C``. Grid mixers (LightNet, Chimera) also accept
    ``[B, *grid, C]`` and set ``grid_native = True``.
    """

    name: ClassVar[str] = ""
    grid_native: ClassVar[bool] = False

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    @abstractmethod
    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``x [B, T, C]`` (and the state after the tokens before it) -> ``(y [B, T, C], state)``."""

    @abstractmethod
    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token ``x_t [B, C]`` -> ``(y_t [B, C], state)``."""

    @abstractmethod
    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The state before the first token (zeros; shapes fixed by the mixer's options)."""

    # -- checks shared by every mixer
    def check_input(self, x: torch.Tensor, ndim: int = 3) -> None:
        """One line if ``x`` is not ``[B, T, C]`` (``[B, C]`` for ``ndim=2``) with ``C = dim``."""
        layout = "[batch, time, channels]" if ndim == 3 else "[batch, channels]"
        if x.ndim != ndim or x.shape[-1] != self.dim:
            raise InputError(f"{type(self).__name__} expects x of shape {layout} with {self.dim} channels, "
                             f"got {list(x.shape)}")

    def check_state(self, state: State, batch_size: int) -> None:
        """One line if ``state`` does not have the tensors ``init_state`` makes for this batch."""
        expected = self.init_state(batch_size, device="meta")
        if not isinstance(state, tuple) or len(state) != len(expected):
            raise InputError(f"{type(self).__name__}: state must be a tuple of {len(expected)} tensors "
                             f"(from init_state), got {type(state).__name__}")
        for i, (got, want) in enumerate(zip(state, expected)):
            if tuple(got.shape) != tuple(want.shape):
                raise InputError(f"{type(self).__name__}: state[{i}] has shape {list(got.shape)}, expected "
                                 f"{list(want.shape)} (a state from another batch size or model?)")


def register_mixer(name: str):
    """Class decorator: make a :class:`Mixer` buildable by ``name`` (and from config)."""

    def wrap(cls: type[Mixer]) -> type[Mixer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise InputError(f"mixer name '{name}' is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    from seqapps.backbones import mixers

    for info in pkgutil.iter_modules(mixers.__path__):
        importlib.import_module(f"{mixers.__name__}.{info.name}")


def available_mixers() -> list[str]:
    """The names of every registered mixer."""
    _discover()
    return sorted(_REGISTRY)


def mixer_class(name: str) -> type[Mixer]:
    _discover()
    if name not in _REGISTRY:
        raise InputError(f"unknown mixer '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_mixer(name: str, dim: int, **kwargs) -> Mixer:
    """``build_mixer("gla", 128, num_heads=4)``."""
    return mixer_class(name)(dim, **kwargs)
