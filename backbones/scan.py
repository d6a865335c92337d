"""Scan orders for N-D grids, and :class:`GridScan`, which runs any 1-D mixer (or block, or
stack) over a grid ``[B, *grid, C]`` in several orders and merges the results.

An *order* is a permutation ``perm`` of the row-major flattened grid: step ``i`` of the scan
visits cell ``perm[i]``, so ``sequence = flat[:, perm]`` and ``flat = sequence[:, inverse]``
with ``inverse = argsort(perm)``. The orders:

- ``raster``: row-major (the last axis fastest);
- ``snake``: boustrophedon; every other line (and, in N-D, every other slice) is walked
  backwards, so consecutive steps are always grid neighbours;
- ``hilbert``: the Hilbert curve. Square grids with a power-of-two side get the exact Hilbert
  curve; any other ``H x W`` gets the *generalized* Hilbert curve (J. Červený's "gilbert"
  construction: split the rectangle into two or three sub-rectangles whose curves join end to
  end, preferring even splits), which keeps the Hilbert locality for any size. It travels
  along an even side when one side is odd and the other even, so every step goes to a grid
  neighbour (the tests check every size up to 24 x 24). For ``N != 2`` dimensions the fallback
  applies the 2-D curve to the last two axes of each slice and visits the slices as a snake
  over the leading axes, reversing every other slice's curve, so steps stay between
  neighbours; a 1-D grid is scanned in order;
- ``zorder``: the Morton (Z-order) curve: cells sorted by the interleaved bits of their
  coordinates (the last axis in the lowest bit); grids that are not powers of two keep the
  Morton order of the cells that exist.

*Directions* add variants of every order: ``forward`` (the order), ``backward`` (its
reversal), ``transposed`` (the order computed on the grid with its axes reversed, e.g. the
column-major raster) and ``transposed_backward``. ``directions=1, 2, 4`` are the first
1, 2 or 4 of these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import torch
from torch import nn

from seqapps.errors import InputError

ORDERS = ("raster", "snake", "hilbert", "zorder")
DIRECTIONS = ("forward", "backward", "transposed", "transposed_backward")
MERGES = ("sum", "mean")
Grid = tuple[int, ...]


# -- the orders, as lists of row-major flat indices
def _check_grid(grid: Sequence[int]) -> Grid:
    grid = tuple(int(g) for g in grid)
    if not grid or any(g < 1 for g in grid):
        raise InputError(f"a scan grid needs at least one axis, each of size >= 1; got {list(grid)}")
    return grid


def _raster(grid: Grid) -> list[int]:
    return list(range(_numel(grid)))


def _numel(grid: Grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def _snake(grid: Grid) -> list[int]:
    """Boustrophedon over N axes: slice ``i`` of the first axis is walked in the order of the
    (N-1)-D snake, reversed for odd ``i``, so it starts where slice ``i - 1`` ended."""
    if len(grid) == 1:
        return list(range(grid[0]))
    inner = _snake(grid[1:])
    size = len(inner)
    order: list[int] = []
    for i in range(grid[0]):
        order.extend(i * size + j for j in (reversed(inner) if i % 2 else inner))
    return order


def _zorder(grid: Grid) -> list[int]:
    """Morton order: sort cells by their coordinates' bits interleaved (last axis lowest)."""
    bits = max(max(g - 1, 1).bit_length() for g in grid)
    dims = len(grid)

    def code(flat: int) -> int:
        value, coords = 0, []
        for g in reversed(grid):
            coords.append(flat % g)
            flat //= g
        for bit in range(bits):  # coords[0] is the last axis
            for axis, c in enumerate(coords):
                value |= ((c >> bit) & 1) << (bit * dims + axis)
        return value

    return sorted(range(_numel(grid)), key=code)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert_cells(x: int, y: int, major: tuple[int, int], minor: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """Cells ``(x, y)`` of the generalized Hilbert curve filling the rectangle that starts at
    ``(x, y)`` and spans the vector ``major`` (along which the curve travels overall) and the
    vector ``minor``. It starts in the corner ``(x, y)`` and ends in the corner ``major`` away."""
    (ax, ay), (bx, by) = major, minor
    length, width = abs(ax + ay), abs(bx + by)
    step_a, step_b = (_sign(ax), _sign(ay)), (_sign(bx), _sign(by))
    if width == 1 or length == 1:  # a single line: walk it
        step, count = (step_a, length) if width == 1 else (step_b, width)
        for i in range(count):
            yield x + i * step[0], y + i * step[1]
        return
    half_a, half_b = (ax // 2, ay // 2), (bx // 2, by // 2)
    if 2 * length > 3 * width:
        # long rectangle: two halves along the major axis (the first of even length if it can be)
        if abs(sum(half_a)) % 2 and length > 2:
            half_a = (half_a[0] + step_a[0], half_a[1] + step_a[1])
        yield from _gilbert_cells(x, y, half_a, minor)
        yield from _gilbert_cells(x + half_a[0], y + half_a[1], (ax - half_a[0], ay - half_a[1]), minor)
        return
    # near square: up the minor axis, across the whole major axis, back down
    if abs(sum(half_b)) % 2 and width > 2:
        half_b = (half_b[0] + step_b[0], half_b[1] + step_b[1])
    yield from _gilbert_cells(x, y, half_b, half_a)
    yield from _gilbert_cells(x + half_b[0], y + half_b[1], major, (bx - half_b[0], by - half_b[1]))
    yield from _gilbert_cells(x + (ax - step_a[0]) + (half_b[0] - step_b[0]),
                              y + (ay - step_a[1]) + (half_b[1] - step_b[1]),
                              (-half_b[0], -half_b[1]), (-(ax - half_a[0]), -(ay - half_a[1])))


def _hilbert_2d(rows: int, cols: int) -> list[int]:
    """(Generalized) Hilbert curve over ``rows x cols`` (``x`` runs along columns), from the
    top-left corner to the other end of the side it travels along. It travels along the longer
    side, unless that side is odd and the other even: that pairing would need a diagonal step,
    and travelling along the even side needs none."""
    along_cols = cols >= rows
    if along_cols and cols % 2 and not rows % 2:
        along_cols = False
    elif not along_cols and rows % 2 and not cols % 2:
        along_cols = True
    if along_cols:
        cells = _gilbert_cells(0, 0, (cols, 0), (0, rows))
    else:
        cells = _gilbert_cells(0, 0, (0, rows), (cols, 0))
    return [y * cols + x for x, y in cells]


def _hilbert(grid: Grid) -> list[int]:
    """2-D: the (generalized) Hilbert curve. N-D: the curve on each plane of the last two axes,
    the planes visited as a snake over the leading axes, every other plane's curve reversed so
    that it starts where the previous one ended (one step along a leading axis)."""
    if len(grid) == 1:
        return list(range(grid[0]))
    plane = _hilbert_2d(grid[-2], grid[-1])
    size = len(plane)
    order: list[int] = []
    planes = _snake(grid[:-2]) if len(grid) > 2 else [0]
    for rank, p in enumerate(planes):
        order.extend(p * size + j for j in (reversed(plane) if rank % 2 else plane))
    return order


_ORDER_FUNCTIONS: dict[str, Callable[[Grid], list[int]]] = {
    "raster": _raster, "snake": _snake, "hilbert": _hilbert, "zorder": _zorder}


@lru_cache(maxsize=256)
def _cached_order(order: str, grid: Grid) -> tuple[int, ...]:
    return tuple(_ORDER_FUNCTIONS[order](grid))


def scan_order(order: str, grid: Sequence[int]) -> torch.Tensor:
    """The permutation ``perm [N]`` (int64) of the row-major flattened ``grid`` that ``order``
    visits: ``sequence = flat[:, perm]``."""
    grid = _check_grid(grid)
    if order not in _ORDER_FUNCTIONS:
        raise InputError(f"unknown scan order '{order}'; available: {', '.join(ORDERS)}")
    return torch.tensor(_cached_order(order, grid), dtype=torch.long)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[perm[i]] = i``: ``flat = sequence[:, inverse]``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def resolve_directions(directions: int | str | Sequence[str]) -> tuple[str, ...]:
    """``1 | 2 | 4`` (the first of :data:`DIRECTIONS`), one name, or a list of names."""
    if isinstance(directions, int) and not isinstance(directions, bool):
        if directions not in (1, 2, 4):
            raise InputError(f"directions={directions}: give 1, 2 or 4, or a list of {', '.join(DIRECTIONS)}")
        return DIRECTIONS[:directions]
    names = (directions,) if isinstance(directions, str) else tuple(directions)
    unknown = [d for d in names if d not in DIRECTIONS]
    if unknown or not names:
        raise InputError(f"unknown scan direction(s) {unknown or names}; available: {', '.join(DIRECTIONS)}")
    return names


def scan_permutation(order: str, direction: str, grid: Sequence[int]) -> torch.Tensor:
    """``order`` in one ``direction`` over ``grid``, as a permutation of the flattened grid."""
    grid = _check_grid(grid)
    resolve_directions(direction)
    if direction.startswith("transposed"):
        # the order on the grid with its axes reversed, mapped back to this grid's flat indices
        axes = tuple(reversed(range(len(grid))))
        transposed_to_flat = torch.arange(_numel(grid)).reshape(grid).permute(axes).reshape(-1)
        perm = transposed_to_flat[scan_order(order, tuple(reversed(grid)))]
    else:
        perm = scan_order(order, grid)
    return perm.flip(0) if direction.endswith("backward") else perm


def scan_paths(grid: Sequence[int], orders: Sequence[str] = ("raster",),
               directions: int | str | Sequence[str] = 1) -> dict[str, torch.Tensor]:
    """Every ``order x direction`` as ``{"<order>_<direction>": perm}`` (in that order)."""
    orders = (orders,) if isinstance(orders, str) else tuple(orders)
    if not orders:
        raise InputError(f"give at least one scan order ({', '.join(ORDERS)})")
    return {f"{o}_{d}": scan_permutation(o, d, grid) for o in orders for d in resolve_directions(directions)}


class GridScan(nn.Module):
    """Run a 1-D module over an N-D grid in several scan orders and merge the outputs.

    ``factory()`` builds one module with the interface ``y, state = module(x [B, T, C])``
    (a mixer, a :class:`~seqapps.backbones.block.Block`, a
    :class:`~seqapps.backbones.stack.SequenceStack`); one is built per path (order x
    direction), each with its own weights, unless ``shared=True``. Each path flattens the grid
    in its order, runs its module, puts the outputs back in grid order; the paths are merged by
    ``merge`` (``"sum"`` or ``"mean"``).

    ``forward(x [B, *grid, C], state=None) -> (y [B, *grid, C], ())``: a whole grid is mixed at
    once (backward and transposed paths see the future), so there is no state to carry and no
    ``step``. With ``grid`` given the permutations are buffers (exported as constants) and any
    other grid is refused; without it they are computed for each new grid size.
    """

    def __init__(self, factory: Callable[[], nn.Module], orders: str | Sequence[str] = ("hilbert",),
                 directions: int | str | Sequence[str] = 2, merge: str = "mean",
                 grid: Sequence[int] | None = None, shared: bool = False):
        super().__init__()
        if merge not in MERGES:
            raise InputError(f"unknown merge '{merge}'; available: {', '.join(MERGES)}")
        self.orders = (orders,) if isinstance(orders, str) else tuple(orders)
        unknown = [o for o in self.orders if o not in ORDERS]
        if unknown or not self.orders:
            raise InputError(f"unknown scan order(s) {unknown or list(self.orders)}; available: {', '.join(ORDERS)}")
        self.directions = resolve_directions(directions)
        self.merge = merge
        self.grid = None if grid is None else _check_grid(grid)
        self.path_names = [f"{o}_{d}" for o in self.orders for d in self.directions]
        # one module per path, or a single one that every path uses
        self.paths = nn.ModuleList([factory() for _ in (self.path_names[:1] if shared else self.path_names)])
        if self.grid is not None:
            for i, perm in enumerate(scan_paths(self.grid, self.orders, self.directions).values()):
                self.register_buffer(f"perm_{i}", perm, persistent=False)
                self.register_buffer(f"inverse_{i}", inverse_permutation(perm), persistent=False)

    def extra_repr(self) -> str:
        return f"paths={self.path_names}, merge={self.merge}, grid={self.grid}"

    def _permutations(self, grid: Grid, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.grid is not None:
            return [(getattr(self, f"perm_{i}"), getattr(self, f"inverse_{i}")) for i in range(len(self.path_names))]
        perms = scan_paths(grid, self.orders, self.directions).values()
        return [(p.to(device), inverse_permutation(p).to(device)) for p in perms]

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """``x [B, *grid, C]`` -> ``(y [B, *grid, C], ())``."""
        if state:
            raise InputError("GridScan mixes a whole grid at once and carries no state; call it with state=None")
        expected = "[batch, *grid, channels]" if self.grid is None else \
            f"[batch, {', '.join(map(str, self.grid))}, channels]"
        if x.ndim < 3 or (self.grid is not None and tuple(x.shape[1:-1]) != self.grid):
            raise InputError(f"GridScan over the grid {list(self.grid) if self.grid else 'any'} expects x of shape "
                             f"{expected}, got {list(x.shape)}")
        grid = tuple(x.shape[1:-1])
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, C]
        merged = None
        for i, (perm, inverse) in enumerate(self._permutations(grid, x.device)):
            y, _ = self.paths[i % len(self.paths)](flat[:, perm])
            y = y[:, inverse]
            merged = y if merged is None else merged + y
        if self.merge == "mean":
            merged = merged / len(self.path_names)
        return merged.reshape(x.shape[:-1] + merged.shape[-1:]), ()

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple:
        """No state: a grid is mixed whole."""
        return ()
