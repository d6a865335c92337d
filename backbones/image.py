"""An image classifier on any mixer, with timm's model interface and registry.

``ImageBackbone``: a convolutional patch embedding (``patch_embed.proj``), learned positions,
a :class:`~seqapps.backbones.stack.SequenceStack` over the patch grid, global pooling and a
linear head. The stack sees the grid ``[B, h, w, C]``: each layer's mixer either scans it in
one or more orders (:class:`~seqapps.backbones.scan.GridScan`) or, for a grid-native mixer
(``grid_native = True``: LightNet, Chimera) with ``scan="native"``, takes it whole.

Importing this module registers ``seqapps_<mixer>_tiny`` with timm for every registered mixer
(:func:`register_timm_models`, idempotent; call it again after registering a mixer later)::

    import seqapps.backbones.image  # noqa: F401  (registers the models)
    model = timm.create_model("seqapps_gla_tiny", num_classes=10, in_chans=1, img_size=8, patch_size=1)

``pretrained=True`` with ``pretrained_cfg_overlay=dict(file="model.safetensors")`` loads our own
export: the file's keys may carry a prefix (``net.``, ``model.`` ...), and what the file says
of itself (classes, input channels, image size, width, depth, patch size) becomes the default,
so timm's own adaptation applies when you ask for something else (another ``num_classes``: a new
head; another ``in_chans``: the first convolution adapted; another ``img_size``: the positions
resampled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, is_model, model_entrypoint, register_model
from torch import nn

from seqapps.backbones.block import MixerSpec, mixer_name
from seqapps.backbones.mixer import available_mixers, mixer_class
from seqapps.backbones.scan import ORDERS, GridScan
from seqapps.backbones.stack import SequenceStack, layer_mixers
from seqapps.errors import InputError

__all__ = ["ImageBackbone", "PatchEmbed", "checkpoint_filter_fn", "describe_weights", "register_timm_models"]
POOLS = ("avg", "max", "")
#: The ``_tiny`` size: small enough to train on 8 x 8 digits or 32 x 32 images on a CPU.
TINY = dict(embed_dim=64, depth=4, mlp_ratio=2.0)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise InputError(f"img_size must be an int or (height, width) of positive ints, got {size}")
    return pair


def _is_grid_native(spec: MixerSpec) -> bool:
    if isinstance(spec, (str, Mapping)):
        return bool(mixer_class(mixer_name(spec)).grid_native)
    return bool(getattr(spec, "grid_native", False))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``embed_dim`` channels by one convolution:
    ``[B, in_chans, H, W] -> [B, H / p, W / p, embed_dim]``."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise InputError(f"img_size {list(img_size)} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise InputError(f"expected images of shape [batch, {self.in_chans}, {self.img_size[0]}, "
                             f"{self.img_size[1]}], got {list(x.shape)}")
        return self.proj(x).permute(0, 2, 3, 1)

    def column(self, x_t: torch.Tensor) -> torch.Tensor:
        """One column of patches: ``[B, in_chans, H, patch_size] -> [B, H / p, embed_dim]``."""
        want = [self.in_chans, self.img_size[0], self.patch_size]
        if x_t.ndim != 4 or list(x_t.shape[1:]) != want:
            raise InputError(f"expected one column of patches of shape [batch, {', '.join(map(str, want))}], "
                             f"got {list(x_t.shape)}")
        return self.proj(x_t).squeeze(-1).transpose(1, 2)


class ImageBackbone(nn.Module):
    """Patch embedding, a stack of mixer blocks over the patch grid, pooling and a head.

    Args:
        img_size, patch_size, in_chans, num_classes, global_pool (``"avg"``, ``"max"`` or ``""``),
            drop_rate (before the head), drop_path_rate: as in timm. ``patch_size=None`` picks
            ``min(img_size) // 8`` (at least 1): an 8 x 8 patch grid.
        embed_dim, depth, mlp_ratio, norm, ffn: the stack (see :class:`SequenceStack`).
        mixer, mixer_kwargs: the mixer of every layer (a list for a hybrid).
        scan: ``"native"`` (grid-native mixers take the grid whole), one of
            :data:`~seqapps.backbones.scan.ORDERS` or a list of them, or ``"auto"``: native
            when every layer's mixer is grid-native, else ``"hilbert"``.
        directions, merge, shared_scan_weights: for scanned layers, see :class:`GridScan`.
        pos_embed: add learned absolute positions to the patches.

    ``forward_features(x [B, in_chans, H, W]) -> [B, h, w, embed_dim]`` (NHWC);
    ``forward_head(features, pre_logits=False) -> [B, num_classes]``.

    Streaming (when :attr:`streams`: every layer grid-native with ``scan="native"``, causal along
    the width): ``step(x_t [B, in_chans, H, patch_size], state) -> (logits [B, num_classes], state)``
    takes the image one column of patches at a time (a scanner's lines, a spectrogram's frames)
    and returns the logits of the columns seen so far; after the last one they are ``forward``'s.
    ``init_state(batch_size)`` is the stack's state, the columns consumed ``[B]`` and the running
    pool ``[B, embed_dim]``; :meth:`image_columns` cuts images into the columns ``step`` takes.
    """

    output_fmt = "NHWC"

    def __init__(self, img_size: int | Sequence[int] = 32, patch_size: int | None = None, in_chans: int = 3,
                 num_classes: int = 10, global_pool: str = "avg", embed_dim: int = 64, depth: int = 4,
                 mixer: MixerSpec | Sequence[MixerSpec] = "gla", mixer_kwargs: Mapping | None = None,
                 scan: str | Sequence[str] = "auto", directions: int | str | Sequence[str] = 2, merge: str = "mean",
                 shared_scan_weights: bool = False, norm: str = "rmsnorm", ffn: str = "glu", mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, pos_embed: bool = True):
        super().__init__()
        if global_pool not in POOLS:
            raise InputError(f"unknown global_pool '{global_pool}'; available: avg, max, '' (none)")
        img_size = _pair(img_size)
        patch_size = max(1, min(img_size) // 8) if patch_size is None else int(patch_size)
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim)) if pos_embed else None
        self.scan = self._resolve_scan(scan, layer_mixers(mixer, depth))
        wrap = None if self.scan == "native" else partial(
            GridScan, orders=self.scan, directions=directions, merge=merge, grid=grid, shared=shared_scan_weights)
        # grid-native mixers stream along the width; each learns the column's height by its own name
        column = {"column_shape": (grid[0],), "num_variates": grid[0]} if self.scan == "native" else None
        self.stack = SequenceStack(embed_dim, depth, mixer, mixer_kwargs, norm=norm, ffn=ffn, mlp_ratio=mlp_ratio,
                                   drop_path=drop_path_rate, wrap_mixer=wrap, mixer_context=column)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _resolve_scan(scan: str | Sequence[str], specs: list[MixerSpec]) -> str | tuple[str, ...]:
        native = [_is_grid_native(s) for s in specs]
        if scan == "auto":
            return "native" if all(native) else ("hilbert",)
        if scan == "native":
            if not all(native):
                flat = sorted({mixer_name(s) for s, n in zip(specs, native) if not n})
                raise InputError(f"scan: native needs grid-native mixers (e.g. lightnet, chimera); {flat} scan 1-D "
                                 f"sequences: give scan one of {', '.join(ORDERS)}")
            return "native"
        orders = (scan,) if isinstance(scan, str) else tuple(scan)
        unknown = [o for o in orders if o not in ORDERS]
        if unknown or not orders:
            raise InputError(f"unknown scan {unknown or list(orders)}; give native, auto or orders from "
                             f"{', '.join(ORDERS)}")
        return orders

    # -- timm's model interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed is not None else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed",
                    blocks=[(r"^stack\.blocks\.(\d+)", None), (r"^stack\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.stack.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, ``forward`` returns the pooled features)."""
        if global_pool is not None:
            if global_pool not in POOLS:
                raise InputError(f"unknown global_pool '{global_pool}'; available: avg, max, '' (none)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, h, w, embed_dim]`` (normed)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x, _ = self.stack(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``[B, h, w, C]`` (``global_pool``), then the head (unless ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        elif self.global_pool == "max":
            x = x.amax(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- streaming, one column of patches at a time
    @property
    def streams(self) -> bool:
        """Whether :meth:`step` works: every layer takes the grid natively and has a ``step``
        (LightNet, Chimera with ``scan="native"``); a scanned grid is mixed whole."""
        return self.scan == "native" and all(hasattr(block.mixer, "step") for block in self.stack.blocks)

    def _check_streams(self) -> None:
        if not self.streams:
            raise InputError(f"this image backbone mixes the whole grid (scan={list(self.scan)}) and cannot stream "
                             "column by column; build it with grid-native mixers (lightnet, chimera) and scan=native")

    def image_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, in_chans, H, W]`` -> their columns of patches ``[B, W / p, in_chans, H, p]``,
        in the order :meth:`step` takes them."""
        p = self.patch_embed.patch_size
        return x.unflatten(3, (-1, p)).permute(0, 3, 1, 2, 4)

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        """``(*stack state, columns consumed [B], running pool [B, embed_dim])`` (no pool for
        ``global_pool=""``)."""
        self._check_streams()
        state = (*self.stack.init_state(batch_size, device=device, dtype=dtype),
                 torch.zeros(batch_size, device=device, dtype=torch.float32))
        if self.global_pool == "avg":
            return state + (torch.zeros(batch_size, self.embed_dim, device=device, dtype=torch.float32),)
        if self.global_pool == "max":
            return state + (torch.full((batch_size, self.embed_dim), float("-inf"), device=device,
                                       dtype=torch.float32),)
        return state

    def step(self, x_t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One column of patches ``x_t [B, in_chans, H, patch_size]`` -> ``(logits [B, num_classes]``
        of the columns seen so far (``[B, h, num_classes]`` of this column for ``global_pool=""``),
        ``state)``. At most ``W / patch_size`` columns: the learned positions end there."""
        self._check_streams()
        pooled = 1 if self.global_pool else 0
        n_stack = len(state) - 1 - pooled
        stack_state, seen = tuple(state[:n_stack]), state[n_stack]
        x = self.patch_embed.column(x_t)  # [B, h, C]
        if self.pos_embed is not None:
            x = x + self.pos_embed[0].transpose(0, 1)[seen.long()]  # the column's positions, [B, h, C]
        y, stack_state = self.stack.step(x, stack_state)
        if not pooled:
            return self.head(self.head_drop(y)), (*stack_state, seen + 1)
        if self.global_pool == "avg":
            pool = state[-1] + y.sum(1)
            features = pool / ((seen + 1) * y.shape[1]).unsqueeze(-1)
        else:
            pool = features = torch.maximum(state[-1], y.amax(1))
        return self.head(self.head_drop(features.to(y.dtype))), (*stack_state, seen + 1, pool)


# -- loading our own weights through timm
_PATCH_WEIGHT = "patch_embed.proj.weight"


def _prefix(keys: Sequence[str]) -> str:
    """The prefix before ``patch_embed.proj.weight`` (e.g. ``"net."`` in a task's export)."""
    found = [k[: -len(_PATCH_WEIGHT)] for k in keys if k.endswith(_PATCH_WEIGHT)]
    if len(found) != 1:
        raise InputError(f"expected the weights of one image backbone (one '*{_PATCH_WEIGHT}' key), found "
                         f"{len(found)} among {len(keys)} keys")
    return found[0]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ImageBackbone) -> dict[str, torch.Tensor]:
    """Our export -> the model's keys: drop the prefix (and any key outside the backbone), and
    resample the learned positions to the model's patch grid."""
    prefix = _prefix(list(state_dict))
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    pos = weights.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        grid = model.pos_embed.shape[1:3]
        weights["pos_embed"] = F.interpolate(pos.permute(0, 3, 1, 2), size=grid, mode="bilinear",
                                             align_corners=False).permute(0, 2, 3, 1)
    return weights


def describe_weights(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a ``.safetensors`` file of an :class:`ImageBackbone` says of itself: the
    pretrained-cfg entries (``num_classes``, ``input_size``) and the model arguments that its
    shapes fix (``embed_dim``, ``depth``, ``patch_size``)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = _prefix(list(shapes))
    embed_dim, in_chans, patch, _ = shapes[prefix + _PATCH_WEIGHT]
    blocks = prefix + "stack.blocks."
    block_ids = {k[len(blocks):].split(".")[0] for k in shapes if k.startswith(blocks)}
    model_args = dict(embed_dim=embed_dim, patch_size=patch, depth=len(block_ids))
    cfg: dict[str, Any] = {}
    head = shapes.get(prefix + "head.weight")
    cfg["num_classes"] = head[0] if head is not None else 0
    pos = shapes.get(prefix + "pos_embed")
    if pos is not None:
        cfg["input_size"] = (in_chans, pos[1] * patch, pos[2] * patch)
    return cfg, model_args


def _pretrained_cfg(**overrides: Any) -> dict[str, Any]:
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                first_conv="patch_embed.proj", classifier="head", license="mit", **overrides)


#: timm reads the default pretrained cfg of ``<name>`` from this module-level dict.
default_cfgs: dict[str, dict[str, Any]] = {}


def _create(variant: str, mixer: str, pretrained: bool = False, **kwargs: Any) -> ImageBackbone:
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    model_args = dict(TINY, mixer=mixer)
    file = overlay.get("file")
    if pretrained and file and str(file).endswith(".safetensors"):
        cfg_from_file, args_from_file = describe_weights(str(file))
        model_args.update(args_from_file)
        for key, value in cfg_from_file.items():
            overlay.setdefault(key, value)
    model_args.update(kwargs)
    return build_model_with_cfg(ImageBackbone, variant, pretrained, pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=checkpoint_filter_fn, **model_args)


def _entrypoint(model_name: str, mixer: str):
    def create(pretrained: bool = False, **kwargs: Any) -> ImageBackbone:
        return _create(model_name, mixer, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = model_name
    create.__module__ = __name__
    create.__doc__ = (f"{model_name}: ImageBackbone with the '{mixer}' mixer, embed_dim {TINY['embed_dim']}, "
                      f"depth {TINY['depth']} (any ImageBackbone argument may be given).")
    return create


def register_timm_models() -> list[str]:
    """Register ``seqapps_<mixer>_tiny`` with timm for every registered mixer (skipping those
    already registered); returns all their names."""
    names = []
    for mixer in available_mixers():
        model_name = f"seqapps_{mixer}_tiny"
        names.append(model_name)
        if is_model(model_name) and model_entrypoint(model_name).__module__ == __name__:
            continue
        default_cfgs[model_name] = _pretrained_cfg()
        globals()[model_name] = register_model(_entrypoint(model_name, mixer))
    return names


register_timm_models()
