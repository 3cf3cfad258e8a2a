"""Cell-list (binning) candidate search for the in-jit neighbour list: linear in the atom count."""

import dataclasses
import itertools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

#: Extra bins along a non-periodic axis beyond the extent at allocation (our choice): atoms may
#: drift that far (one candidate radius per bin) before the outermost bins start collecting
#: the atoms beyond them (still correct, only denser: see `cell_list_pairs`).
NONPERIODIC_SLACK_BINS = 2
#: Head-room of the per-bin capacity over the fullest bin at allocation (our choice; JAX-MD
#: uses the same idea for its cell list).
BIN_CAPACITY_MULTIPLIER = 1.5


@dataclasses.dataclass(frozen=True)
class CellGrid:
    """The static shape of a cell list, fixed at allocation.

    Bins are boxes in the fractional coordinates of the binning cell (the system's cell when
    any axis is periodic, the identity otherwise). Along a periodic axis of width `w` there
    are `bins = max(1, floor(w / radius))` bins and a candidate lies at most
    `reach = ceil(radius * bins / w)` bins away (more than one only for cells narrower than the
    radius, where images of the same bin are searched). Along a non-periodic axis a bin is
    `radius` thick and `reach` is 1.

    **Fields:**

    - `bins`, `reach`: per axis, as above.
    - `bin_capacity`: atom slots per bin (a fuller bin sets the list's overflow flag).
    """

    bins: tuple[int, int, int]
    reach: tuple[int, int, int]
    bin_capacity: int

    @property
    def offsets(self) -> np.ndarray:
        """Every bin offset `(d0, d1, d2)` with `|d_a| <= reach_a`, shape `(offsets, 3)`."""
        ranges = [range(-r, r + 1) for r in self.reach]
        return np.asarray(list(itertools.product(*ranges)), dtype=np.int32)


def perpendicular_widths(cell: Float[Array, "3 3"]) -> Float[Array, "3"]:
    """Width of the cell along each lattice direction: `V / |a_b x a_c|`."""
    volume = jnp.abs(jnp.linalg.det(cell))
    cross = jnp.stack([jnp.cross(cell[1], cell[2]), jnp.cross(cell[2], cell[0]), jnp.cross(cell[0], cell[1])])
    return volume / jnp.maximum(jnp.linalg.norm(cross, axis=-1), jnp.finfo(cell.dtype).tiny)


def binning_frame(
    positions: Float[Array, "atoms 3"], cell: Float[Array, "3 3"], pbc: tuple[bool, bool, bool]
) -> tuple[Float[Array, "atoms 3"], Float[Array, "3 3"], Float[Array, "3"]]:
    """Fractional coordinates in the binning cell, that cell, and its perpendicular widths."""
    frame = cell if any(pbc) else jnp.eye(3, dtype=positions.dtype)
    frac = jnp.linalg.solve(frame.T, positions.T).T
    return frac, frame, perpendicular_widths(frame)


def _bin_coordinates(frac, widths, pbc, radius, grid: CellGrid):
    """Integer bin coordinates `(atoms, 3)` of wrapped fractional positions (clamped at the edges)."""
    bins = jnp.asarray(grid.bins)
    periodic = jnp.asarray(pbc)
    # periodic: `bins` equal slices of [0, 1); non-periodic: slices `radius` thick from the lowest atom
    scale = jnp.where(periodic, bins.astype(frac.dtype), widths / radius)
    origin = jnp.where(periodic, 0.0, jnp.min(frac, axis=0))
    coords = jnp.floor((frac - origin) * scale).astype(jnp.int32)
    return jnp.clip(coords, 0, bins - 1)


def plan_grid(
    positions: Float[Array, "atoms 3"], cell: Float[Array, "3 3"], pbc: tuple[bool, bool, bool], radius: float
) -> CellGrid:
    """Size a cell list for `positions` (host; reads the bin occupancy).

    **Arguments:**

    - `positions`: positions wrapped into the cell along periodic axes (Å).
    - `cell`: lattice vectors as rows.
    - `pbc`: periodicity per axis.
    - `radius`: candidate radius (cutoff + skin), Å.

    **Returns:**

    The `CellGrid`.
    """
    frac, _, widths = binning_frame(positions, cell, pbc)
    widths_np = np.asarray(widths, dtype=np.float64)
    extent = np.asarray(jnp.max(frac, axis=0) - jnp.min(frac, axis=0), dtype=np.float64)
    bins, reach = [], []
    for a in range(3):
        if pbc[a]:
            n = max(1, math.floor(widths_np[a] / radius))
            bins.append(n)
            reach.append(max(1, math.ceil(radius * n / widths_np[a] - 1e-12)))
        else:
            bins.append(int(math.floor(extent[a] * widths_np[a] / radius)) + 1 + NONPERIODIC_SLACK_BINS)
            reach.append(1)
    grid = CellGrid((bins[0], bins[1], bins[2]), (reach[0], reach[1], reach[2]), 1)
    coords = np.asarray(_bin_coordinates(frac, widths, pbc, radius, grid))
    flat = np.ravel_multi_index(coords.T, grid.bins)
    fullest = int(np.bincount(flat).max())
    return dataclasses.replace(grid, bin_capacity=max(1, math.ceil(fullest * BIN_CAPACITY_MULTIPLIER)))


def grid_still_valid(
    cell: Float[Array, "3 3"], pbc: tuple[bool, bool, bool], radius: float, grid: CellGrid
) -> Bool[Array, ""]:
    """Whether the periodic bins still reach every candidate in a (deformed) `cell`."""
    if not any(pbc):
        return jnp.asarray(True)
    widths = perpendicular_widths(cell)
    needed = jnp.ceil(radius * jnp.asarray(grid.bins, widths.dtype) / widths - 1e-12)
    return jnp.all(jnp.where(jnp.asarray(pbc), needed <= jnp.asarray(grid.reach), True))


def cell_list_pairs(
    wrapped: Float[Array, "atoms 3"],
    cell: Float[Array, "3 3"],
    pbc: tuple[bool, bool, bool],
    radius: float,
    grid: CellGrid,
    capacity: int,
) -> tuple[Int[Array, " capacity"], Int[Array, " capacity"], Float[Array, "capacity 3"], Bool[Array, " capacity"],
           Int[Array, ""], Bool[Array, ""]]:  # fmt: skip
    """Every directed pair `(target i, source j, image S)` with `0 < |w_j - w_i + S H| <= radius`.

    Each atom looks only at the bins within `grid.reach` of its own (with the image offset of
    each wrapped bin along periodic axes), so the work is `atoms x offsets x bin_capacity`.
    Atoms outside the bins along a non-periodic axis are counted in the outermost bin: since a
    bin is at least `radius` thick, every candidate of such an atom is in that bin or its
    neighbour, so nothing is missed.

    **Arguments:**

    - `wrapped`: positions wrapped into the cell along periodic axes (Å).
    - `cell`: lattice vectors as rows.
    - `pbc`: periodicity per axis.
    - `radius`: candidate radius, Å.
    - `grid`: the static grid from `plan_grid`.
    - `capacity`: pairs kept (sorted by target, source, image); the rest is reported.

    **Returns:**

    `(target, source, shift, valid, count, overflow)`: the first `capacity` pairs in the order
    of [`uma_eqx.neighbors.radius_graph`][] (invalid slots last), the number found, and whether
    a bin or the pair buffer overflowed.
    """
    n = wrapped.shape[0]
    frac, _, widths = binning_frame(wrapped, cell, pbc)
    coords = _bin_coordinates(frac, widths, pbc, radius, grid)
    bins = jnp.asarray(grid.bins)
    num_bins = int(np.prod(grid.bins))
    flat = (coords[:, 0] * grid.bins[1] + coords[:, 1]) * grid.bins[2] + coords[:, 2]
    order = jnp.argsort(flat, stable=True)
    sorted_bins = flat[order]
    start = jnp.searchsorted(sorted_bins, jnp.arange(num_bins), side="left")
    count_in_bin = jnp.searchsorted(sorted_bins, jnp.arange(num_bins), side="right") - start
    bin_overflow = jnp.max(count_in_bin) > grid.bin_capacity
    slot = start[:, None] + jnp.arange(grid.bin_capacity)[None, :]
    members = jnp.where(
        jnp.arange(grid.bin_capacity)[None, :] < count_in_bin[:, None], order[jnp.minimum(slot, n - 1)], -1
    )  # (bins, bin_capacity), -1 for empty slots

    offsets = jnp.asarray(grid.offsets)  # (K, 3)
    periodic = jnp.asarray(pbc)
    neighbour = coords[:, None, :] + offsets[None, :, :]  # (atoms, K, 3)
    image = jnp.where(periodic, jnp.floor_divide(neighbour, bins), 0)
    inside = jnp.all(periodic | ((neighbour >= 0) & (neighbour < bins)), axis=-1)
    wrapped_bin = jnp.where(periodic, jnp.mod(neighbour, bins), jnp.clip(neighbour, 0, bins - 1))
    nb_flat = (wrapped_bin[..., 0] * grid.bins[1] + wrapped_bin[..., 1]) * grid.bins[2] + wrapped_bin[..., 2]
    source = members[nb_flat]  # (atoms, K, bin_capacity)
    shift = image.astype(wrapped.dtype)  # (atoms, K, 3)
    vec = wrapped[jnp.maximum(source, 0)] - wrapped[:, None, None, :] + (shift @ cell)[:, :, None, :]
    d2 = jnp.sum(vec * vec, axis=-1)
    target = jnp.broadcast_to(jnp.arange(n)[:, None, None], source.shape)
    self_pair = (source == target) & jnp.all(image == 0, axis=-1)[:, :, None]
    mask = (source >= 0) & inside[:, :, None] & (d2 <= radius**2) & ~self_pair
    found = jnp.sum(mask, dtype=jnp.int32)

    (picked,) = jnp.nonzero(mask.reshape(-1), size=capacity, fill_value=-1)
    valid = picked >= 0
    picked = jnp.where(valid, picked, 0)
    per_atom = source.shape[1] * source.shape[2]
    i = picked // per_atom
    k = (picked % per_atom) // source.shape[2]
    j = source.reshape(-1)[picked]
    s = shift[i, k]
    # the host graph's order: target, source, then the image offsets (invalid slots last)
    big = jnp.asarray(n, jnp.int32)
    key_t, key_j = jnp.where(valid, i, big), jnp.where(valid, j, big)
    perm = jnp.lexsort((s[:, 2], s[:, 1], s[:, 0], key_j, key_t))
    return i[perm], j[perm], s[perm], valid[perm], found, bin_overflow | (found > capacity)
