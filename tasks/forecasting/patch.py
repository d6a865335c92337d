"""The backbone forecaster: PatchTST-style patches of each channel through any seqapps 1-D stack.

Nie, Nguyen, Sinthong, Kalagnanam, "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers" (ICLR 2023), with the reversible instance normalisation of Kim et al., "Reversible
Instance Normalization for Accurate Time-Series Forecasting against Distribution Shift"
(ICLR 2022). The paper's Transformer encoder is replaced by a :class:`SequenceStack` whose mixer
is picked by name (``backbone/mixer=gla|mamba|attention|...``); the mixers are causal, so each
patch token sees the patches before it, and the flatten head reads every token.

Plain ``torch.nn`` (no Lightning), so that ``seqapps.load`` can rebuild it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from seqapps.errors import InputError
from seqapps.tasks.forecasting.revin import RevIN


def patch_count(seq_len: int, patch_len: int, stride: int, pad_end: bool = True) -> int:
    """Number of patches of a lookback (``pad_end``: the last value repeated ``stride`` times)."""
    return (seq_len - patch_len) // stride + 1 + (1 if pad_end else 0)


class PatchForecaster(nn.Module):
    """Patches of each channel -> linear patch embedding (+ learned positions) -> a 1-D stack
    over the patch tokens -> flatten -> linear to ``pred_len``; channel independent, RevIN.

    Shapes: ``x [B, seq_len, n_in]`` -> ``[B, pred_len, n_out]``; every channel is forecast
    from its own history by the same weights (``[B * n_in, n_patches, dim]`` inside), and for
    ``n_out < n_in`` (features ``MS``) the last ``n_out`` channels are returned, as the
    Time-Series-Library does.

    Args:
        seq_len, pred_len: lookback and horizon.
        n_in, n_out: channels in and out (``n_out`` is ``n_in`` or 1).
        backbone: a module ``[N, T, dim] -> [N, T, dim]`` (or ``(y, state)``) with a ``dim``
            attribute, e.g. :class:`seqapps.backbones.SequenceStack`.
        patch_len, stride: patch length and step (``stride < patch_len``: overlapping patches;
            ``stride == patch_len``: non-overlapping).
        pad_end: repeat the last value ``stride`` times before patching (the paper's one extra patch).
        revin, affine: reversible instance normalisation, with a learned per-channel affine map.
        pos_embed: add a learned position embedding to the patch tokens.
        dropout, head_dropout: after the embedding, and before the head's linear layer.
    """

    def __init__(self, seq_len: int, pred_len: int, n_in: int, n_out: int, backbone: nn.Module,
                 patch_len: int = 16, stride: int = 8, pad_end: bool = True, revin: bool = True,
                 affine: bool = True, pos_embed: bool = True, dropout: float = 0.0,
                 head_dropout: float = 0.0):
        super().__init__()
        if n_out not in (1, n_in):
            raise InputError(f"PatchForecaster: n_out={n_out} with n_in={n_in}; n_out must be 1 (MS) or "
                             "n_in (S, M)")
        if not 1 <= stride <= patch_len <= seq_len:
            raise InputError(f"PatchForecaster: patch_len={patch_len}, stride={stride} with "
                             f"seq_len={seq_len}; need 1 <= stride <= patch_len <= seq_len")
        dim = getattr(backbone, "dim", None)
        if not isinstance(dim, int):
            raise InputError(f"PatchForecaster: the backbone {type(backbone).__name__} has no integer "
                             "'dim' (its width); use a seqapps SequenceStack")
        self.seq_len, self.pred_len, self.n_in, self.n_out = seq_len, pred_len, n_in, n_out
        self.patch_len, self.stride, self.pad_end = patch_len, stride, pad_end
        self.n_patches = patch_count(seq_len, patch_len, stride, pad_end)
        self.revin = RevIN(n_in, affine) if revin else None
        self.embed = nn.Linear(patch_len, dim)
        self.pos = nn.Parameter(torch.empty(self.n_patches, dim).uniform_(-0.02, 0.02)) if pos_embed else None
        self.dropout = nn.Dropout(dropout)
        self.backbone = backbone
        self.head = nn.Sequential(nn.Flatten(start_dim=1), nn.Dropout(head_dropout),
                                  nn.Linear(self.n_patches * dim, pred_len))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, seq_len, C]`` -> one row of patches per channel ``[B * C, n_patches, patch_len]``."""
        series = x.permute(0, 2, 1).reshape(-1, self.seq_len)
        if self.pad_end:
            series = torch.cat([series, series[:, -1:].expand(-1, self.stride)], dim=1)
        return series.unfold(1, self.patch_len, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.n_in:
            raise InputError(f"PatchForecaster expects x of shape [batch, {self.seq_len}, {self.n_in}], "
                             f"got {list(x.shape)}")
        b = x.shape[0]
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        tokens = self.embed(self.patches(x))  # [B * C, n_patches, dim]
        if self.pos is not None:
            tokens = tokens + self.pos
        out = self.backbone(self.dropout(tokens))
        tokens = out[0] if isinstance(out, tuple) else out
        y = self.head(tokens).reshape(b, self.n_in, self.pred_len).permute(0, 2, 1)  # [B, H, C]
        if self.revin is not None:
            y = self.revin.denormalize(y, stats)
        return y[..., self.n_in - self.n_out:].contiguous()  # [B, H, n_out]
