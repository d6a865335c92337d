"""Scan orders (each a permutation with its inverse; Hilbert and snake steps go to grid
neighbours; Z-order on a known case; directions) and GridScan (merging, unpermuting, bad grids)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from seqapps.backbones import GridScan, inverse_permutation, scan_order, scan_paths, scan_permutation
from seqapps.backbones.scan import ORDERS
from seqapps.errors import InputError

GRIDS = [(1,), (7,), (1, 5), (4, 4), (3, 5), (6, 7), (8, 8), (2, 3, 4), (2, 2, 3, 3)]


def coordinates(perm: torch.Tensor, grid) -> np.ndarray:
    """``[N, ndim]`` grid coordinates of the cells in scan order."""
    return np.stack(np.unravel_index(perm.numpy(), grid), axis=1)


def steps_l1(perm: torch.Tensor, grid) -> np.ndarray:
    return np.abs(np.diff(coordinates(perm, grid), axis=0)).sum(1)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_every_order_is_a_permutation_with_an_inverse(order, grid):
    n = int(np.prod(grid))
    for direction in ("forward", "backward", "transposed", "transposed_backward"):
        perm = scan_permutation(order, direction, grid)
        assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))
        inverse = inverse_permutation(perm)
        flat = torch.randn(2, n, 3)
        assert torch.equal(flat[:, perm][:, inverse], flat)
        assert torch.equal(inverse, torch.argsort(perm))


def test_hilbert_steps_go_to_grid_neighbours_for_every_size():
    for rows, cols in itertools.product(range(1, 25), repeat=2):
        steps = steps_l1(scan_order("hilbert", (rows, cols)), (rows, cols))
        assert (steps == 1).all(), f"{rows}x{cols}: a step of length {steps.max()}"
    for grid in [(3, 4, 5), (2, 3, 6, 5)]:  # N-D fallback: planes joined as a snake
        assert (steps_l1(scan_order("hilbert", grid), grid) == 1).all()


def fills_blocks_one_at_a_time(coords: np.ndarray, block: int) -> bool:
    """Whether the scan enters every aligned ``block x block`` square once and fills it."""
    labels = [tuple(c // block) for c in coords]
    runs = [label for i, label in enumerate(labels) if i == 0 or label != labels[i - 1]]
    return len(runs) == len(set(labels))


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_hilbert_on_power_of_two_squares_is_the_hilbert_curve(side):
    """The Hilbert curve fills every aligned 2^k x 2^k block before leaving it, starts in a
    corner and ends in the next corner (what raster and snake do not)."""
    grid = (side, side)
    coords = coordinates(scan_order("hilbert", grid), grid)
    assert tuple(coords[0]) == (0, 0) and tuple(coords[-1]) in {(0, side - 1), (side - 1, 0)}
    blocks = [2 ** k for k in range(1, side.bit_length() - 1)]
    assert all(fills_blocks_one_at_a_time(coords, b) for b in blocks)
    snake = coordinates(scan_order("snake", grid), grid)
    assert not any(fills_blocks_one_at_a_time(snake, b) for b in blocks)


@pytest.mark.parametrize("grid", [(4, 5), (3, 4, 5), (2, 3, 2, 3)], ids=str)
def test_snake_steps_go_to_grid_neighbours(grid):
    assert (steps_l1(scan_order("snake", grid), grid) == 1).all()
    assert scan_order("snake", (3, 4)).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]


def test_zorder_known_cases():
    assert scan_order("zorder", (4, 4)).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert scan_order("zorder", (2, 2, 2)).tolist() == list(range(8))  # bits (z, y, x) = the raster index
    assert scan_order("zorder", (2, 3)).tolist() == [0, 1, 3, 4, 2, 5]  # the cells of the 4x4 curve that exist


def test_directions_reverse_and_transpose():
    assert scan_permutation("raster", "backward", (2, 3)).tolist() == [5, 4, 3, 2, 1, 0]
    assert scan_permutation("raster", "transposed", (2, 3)).tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert scan_permutation("raster", "transposed_backward", (2, 3)).tolist() == [5, 2, 4, 1, 3, 0]
    paths = scan_paths((4, 4), ["hilbert", "zorder"], 4)
    assert list(paths) == [f"{o}_{d}" for o in ("hilbert", "zorder")
                           for d in ("forward", "backward", "transposed", "transposed_backward")]
    assert list(scan_paths((4, 4), "snake", ["backward"])) == ["snake_backward"]


class Identity(nn.Module):
    def forward(self, x, state=None):
        return x, ()


class CumulativeSum(nn.Module):
    """A causal 1-D module: ``y_t = x_1 + ... + x_t``."""

    def forward(self, x, state=None):
        return x.cumsum(1), ()


def test_grid_scan_merges_identity_paths():
    x = torch.randn(2, 3, 5, 4)
    y, state = GridScan(Identity, orders=["hilbert", "zorder"], directions=4, merge="mean")(x)
    assert state == () and y.shape == x.shape
    torch.testing.assert_close(y, x)
    y, _ = GridScan(Identity, orders="snake", directions=2, merge="sum")(x)
    torch.testing.assert_close(y, 2 * x)


@pytest.mark.parametrize("fixed_grid", [True, False])
def test_grid_scan_puts_each_path_back_in_grid_order(fixed_grid):
    x = torch.randn(2, 3, 4, 5)
    flat = x.reshape(2, 12, 5)
    scan = GridScan(CumulativeSum, orders=["raster", "snake"], directions=["forward", "transposed_backward"],
                    merge="sum", grid=(3, 4) if fixed_grid else None)
    expected = torch.zeros_like(flat)
    for order, direction in itertools.product(["raster", "snake"], ["forward", "transposed_backward"]):
        perm = scan_permutation(order, direction, (3, 4))
        expected[:, perm] += flat[:, perm].cumsum(1)
    torch.testing.assert_close(scan(x)[0], expected.reshape(x.shape))
    raster_only = GridScan(CumulativeSum, orders="raster", directions=1)(x)[0]
    torch.testing.assert_close(raster_only, flat.cumsum(1).reshape(x.shape))


def test_grid_scan_builds_a_module_per_path_unless_shared():
    assert len(GridScan(lambda: nn.Linear(4, 4), orders="hilbert", directions=4).paths) == 4
    shared = GridScan(lambda: nn.Linear(4, 4), orders="hilbert", directions=4, shared=True)
    assert len(shared.paths) == 1 and len(shared.path_names) == 4


def test_grid_scan_runs_a_stack():
    from seqapps.backbones import SequenceStack

    class Recurrent(nn.Module):  # any causal 1-D mixer with the mixer interface
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x, state=None):
            return self.proj(x).cumsum(1), ()

        def init_state(self, batch_size, device=None, dtype=None):
            return ()

    scan = GridScan(lambda: SequenceStack(8, depth=2, mixer=Recurrent), orders="hilbert", directions=2, grid=(4, 4))
    y, _ = scan(torch.randn(3, 4, 4, 8))
    assert y.shape == (3, 4, 4, 8) and torch.isfinite(y).all()


def test_bad_grids_and_options_are_one_line():
    scan = GridScan(Identity, orders="hilbert", grid=(4, 4))
    with pytest.raises(InputError, match=r"grid \[4, 4\] expects x of shape \[batch, 4, 4, channels\], "
                                         r"got \[2, 4, 5, 8\]"):
        scan(torch.randn(2, 4, 5, 8))
    with pytest.raises(InputError, match=r"got \[2, 8\]"):
        GridScan(Identity)(torch.randn(2, 8))
    with pytest.raises(InputError, match="unknown scan order"):
        GridScan(Identity, orders="spiral")
    with pytest.raises(InputError, match="unknown scan direction"):
        GridScan(Identity, directions=["sideways"])
    with pytest.raises(InputError, match="directions=3"):
        GridScan(Identity, directions=3)
    with pytest.raises(InputError, match="unknown merge"):
        GridScan(Identity, merge="max")
    with pytest.raises(InputError, match="size >= 1"):
        scan_order("raster", (0, 3))
