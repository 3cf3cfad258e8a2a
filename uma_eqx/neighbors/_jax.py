"""In-jit, fixed-capacity Verlet neighbour list with general triclinic PBC and small cells."""

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._constants import MAX_NEIGHBORS
from ._cells import CellGrid, cell_list_pairs, grid_still_valid, perpendicular_widths, plan_grid

#: Default Verlet skin in Å: pairs within `cutoff + skin` are kept as candidates, and the
#: list is rebuilt once atoms have moved far enough to bring a new pair inside the cutoff.
DEFAULT_SKIN = 0.5
#: Default head-room of the candidate buffer over the count found at allocation
#: (JAX-MD's `partition.neighbor_list(capacity_multiplier=1.25)`).
DEFAULT_CAPACITY_MULTIPLIER = 1.25
#: Largest `atoms² × images` pair table the brute-force rebuild will materialise (elements).
MAX_PAIR_TABLE = 64_000_000


class NeighborList(eqx.Module):
    """A fixed-capacity list of candidate edges `(source j, target i, image S)`, as arrays.

    Holds every directed pair with `0 < |r_j - r_i + S H| <= cutoff + skin` at the last
    rebuild, sorted by target then source then image (the order of
    [`uma_eqx.neighbors.radius_graph`][]). Unused slots are masked self-loops on the last
    atom with zero shift. The model sees only the candidates inside the cutoff
    ([`uma_eqx.neighbors.NeighborListFns.graph_mask`][]), so between rebuilds the edge set
    is exactly the host graph's.

    Fields: `edge_index` `(2, capacity)`, `edge_shift` `(capacity, 3)` (integer image
    offsets as floats), `edge_mask`, `reference_positions` and `reference_cell` (at the last
    rebuild, Cartesian, Å), `num_candidates` (pairs found at the last rebuild),
    `did_buffer_overflow` (the buffer or the image range was too small at some rebuild: the
    list is invalid and must be reallocated with
    [`uma_eqx.neighbors.NeighborListFns.allocate`][]), and the static `image_range` (the
    largest `|S_a|` searched per axis, fixed at allocation) and `minimum_image` (the cell is
    at least twice `cutoff + skin` wide along every periodic axis, so each pair has at most one
    image in range, found by rounding: an `atoms²` search instead of `atoms² × images`), and
    the static `grid` of a cell-list search (`None` for the all-pairs search).
    """

    edge_index: Int[Array, "2 capacity"]
    edge_shift: Float[Array, "capacity 3"]
    edge_mask: Bool[Array, " capacity"]
    reference_positions: Float[Array, "atoms 3"]
    reference_cell: Float[Array, "3 3"]
    num_candidates: Int[Array, ""]
    did_buffer_overflow: Bool[Array, ""]
    image_range: tuple[int, int, int] = eqx.field(static=True)
    minimum_image: bool = eqx.field(static=True, default=False)
    grid: CellGrid | None = eqx.field(static=True, default=None)

    @property
    def capacity(self) -> int:
        """Number of slots (static)."""
        return self.edge_index.shape[1]


@dataclasses.dataclass(frozen=True)
class NeighborListFns:
    """Allocate and update a [`uma_eqx.neighbors.NeighborList`][] (JAX-MD style).

    `allocate` runs on the host (it sizes the buffer); `update` is a pure function that can
    run inside `jit`, `lax.scan` or `lax.fori_loop`: it rebuilds the list only when some atom
    moved (or the cell deformed) enough that a pair outside `cutoff + skin` could have come
    inside the cutoff, using the bound

    $$|\\Delta d_{ij}| \\le 2 \\max_k |\\Delta r_k| + \\max_S |S\\,\\Delta H|,$$

    and otherwise returns it unchanged. Positions wrapped back into the cell by the integrator
    do not count as moved ([`uma_eqx.neighbors.NeighborListFns.unwrap`][]).

    Every periodic image within `cutoff + skin` is found, also when the cell is narrower than
    twice the cutoff: the rebuild loops over the image offsets `S` with
    `|S_a| <= ceil((cutoff + skin) / w_a)` (`w_a` the cell's width perpendicular to the
    other two lattice vectors), fixed at allocation. When the candidates no longer fit the
    buffer, or a deformed cell needs more images, `did_buffer_overflow` is set (and stays
    set) and the caller must reallocate; neighbours are never dropped silently.

    The rebuild is a brute-force pair search (no cell list): `atoms²` distances when every
    periodic width is at least `2 (cutoff + skin)` (minimum image), else `atoms² × images`;
    fine up to a few thousand atoms; larger tables are refused at allocation.

    **Arguments:**

    - `cutoff`: the model's cutoff in Å (inclusive, as fairchem).
    - `pbc`: periodicity per axis.
    - `skin`: Verlet skin in Å.
    - `capacity_multiplier`: buffer head-room over the count at allocation.
    - `max_neighbors`: fairchem's per-atom neighbour cap. The in-jit list does not apply the
        cap; [`uma_eqx.neighbors.NeighborListFns.graph_mask`][] reports an atom above it so
        the caller can refuse (the host graph applies it exactly).
    - `method`: the candidate search. `"all_pairs"`: every pair (and image) of atoms, cheapest
        for small systems, refused above `MAX_PAIR_TABLE` pair entries. `"cell_list"`: atoms
        binned into boxes at least `cutoff + skin` wide, each atom looking at the neighbouring
        boxes only (linear in the atom count; see `uma_eqx.neighbors._cells.cell_list_pairs`).
        `"auto"` (default): all pairs up to `MAX_PAIR_TABLE`, the cell list beyond.
    """

    cutoff: float
    pbc: tuple[bool, bool, bool]
    skin: float = DEFAULT_SKIN
    capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER
    max_neighbors: int | None = MAX_NEIGHBORS
    method: Literal["auto", "all_pairs", "cell_list"] = "auto"

    def __post_init__(self):
        if not (math.isfinite(self.cutoff) and self.cutoff > 0):
            raise ValueError(f"cutoff must be a positive number of Å, got {self.cutoff!r}.")
        if not (math.isfinite(self.skin) and self.skin >= 0):
            raise ValueError(f"skin must be a non-negative number of Å, got {self.skin!r}.")
        if self.method not in ("auto", "all_pairs", "cell_list"):
            raise ValueError(f"method must be 'auto', 'all_pairs' or 'cell_list', got {self.method!r}.")
        if not self.capacity_multiplier >= 1.0:
            raise ValueError(f"capacity_multiplier must be >= 1, got {self.capacity_multiplier!r}.")
        pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)))
        object.__setattr__(self, "pbc", pbc)

    @property
    def radius(self) -> float:
        """`cutoff + skin`, the candidate radius in Å."""
        return self.cutoff + self.skin

    def _needed_range(self, cell: Float[Array, "3 3"]) -> Int[Array, "3"]:
        widths = perpendicular_widths(cell)
        needed = jnp.ceil(self.radius / widths).astype(jnp.int32)
        return jnp.where(jnp.asarray(self.pbc), needed, 0)

    def allocate(
        self,
        positions: Float[Array | np.ndarray, "atoms 3"],
        cell: Float[Array | np.ndarray, "3 3"],
        extra_capacity: int = 0,
    ) -> NeighborList:
        """Size the image range and the buffer for `positions` and `cell`; build the list.

        Runs on the host (not jit-able: it reads the count).

        **Arguments:**

        - `positions`: Cartesian positions in Å.
        - `cell`: lattice vectors as rows (any non-degenerate matrix when `pbc` is all False).
        - `extra_capacity`: slots to add on top of `capacity_multiplier × count`.

        **Returns:**

        The list, with a buffer of `capacity_multiplier × count + extra_capacity` slots and
        the image range this cell needs.
        """
        positions = jnp.asarray(positions)
        cell = jnp.asarray(cell, positions.dtype)
        if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
            raise ValueError(f"positions must have shape (atoms >= 1, 3), got {positions.shape}.")
        if not bool(jnp.all(jnp.isfinite(positions))):
            raise ValueError("positions contain NaN or inf; the neighbour list needs finite positions.")
        if any(self.pbc):
            volume = abs(float(jnp.linalg.det(cell)))
            if not (math.isfinite(volume) and volume > 1e-6):
                raise ValueError(
                    f"cell {np.asarray(cell).tolist()} has volume {volume:g} Å³ but pbc={list(self.pbc)}; "
                    "give three independent lattice vectors or use pbc=False."
                )
        needed = np.asarray(self._needed_range(cell))
        image_range = (int(needed[0]), int(needed[1]), int(needed[2]))
        minimum_image = any(self.pbc) and bool(self._minimum_image_ok(cell))
        num_images = 1 if minimum_image else len(_image_shifts(image_range))
        table = positions.shape[0] ** 2 * num_images
        if self.method == "cell_list" or (self.method == "auto" and table > MAX_PAIR_TABLE):
            wrapped, _ = self._wrap(positions, cell)
            grid = plan_grid(wrapped, cell, self.pbc, self.radius)
            *_, count, _ = cell_list_pairs(wrapped, cell, self.pbc, self.radius, grid, 1)
            capacity = max(math.ceil(int(count) * self.capacity_multiplier) + int(extra_capacity), 1)
            return self._build(positions, cell, capacity, image_range, False, grid=grid)
        if table > MAX_PAIR_TABLE:
            raise ValueError(
                f"in-jit neighbour list: {positions.shape[0]} atoms x {num_images} images = "
                f"{table:,} pairs exceeds {MAX_PAIR_TABLE:,} for method='all_pairs'; use method='cell_list' "
                "(or 'auto')."
            )
        mask, _ = self._candidate_mask(positions, cell, image_range, minimum_image)
        count = int(jnp.sum(mask))
        capacity = max(math.ceil(count * self.capacity_multiplier) + int(extra_capacity), 1)
        return self._build(positions, cell, capacity, image_range, minimum_image)

    def _minimum_image_ok(self, cell: Float[Array, "3 3"]) -> Bool[Array, ""]:
        widths = perpendicular_widths(cell)
        return jnp.all(jnp.where(jnp.asarray(self.pbc), widths >= 2.0 * self.radius, True))

    def _candidate_mask(
        self,
        positions: Float[Array, "atoms 3"],
        cell: Float[Array, "3 3"],
        image_range: tuple[int, int, int],
        minimum_image: bool,
    ) -> tuple[Bool[Array, "atoms atoms images"], Float[Array, "_ _ images 3"]]:
        """Pairs `(target i, source j, image k)` within `cutoff + skin`, and their shifts `S`."""
        n = positions.shape[0]
        wrapped, _ = self._wrap(positions, cell)
        if minimum_image:
            # One candidate image per pair: the fractional difference rounded to the nearest
            # lattice vector (exact when every periodic width is >= 2 (cutoff + skin)).
            frac = jnp.linalg.solve(cell.T, wrapped.T).T
            delta = frac[None, :, :] - frac[:, None, :]
            shifts = jnp.where(jnp.asarray(self.pbc), -jnp.round(delta), 0.0)[:, :, None, :]
        else:
            # vec[i, j, k] = w_j - w_i + S_k H, where |S_a| <= ceil((cutoff + skin) / w_a)
            # finds every image of positions wrapped into the cell.
            shifts = jnp.asarray(_image_shifts(image_range), positions.dtype)[None, None]
        vec = wrapped[None, :, None, :] - wrapped[:, None, None, :] + shifts @ cell
        d2 = jnp.sum(vec * vec, axis=-1)
        zero_shift = jnp.all(shifts == 0, axis=-1)
        self_pair = jnp.eye(n, dtype=bool)[:, :, None] & zero_shift
        return (d2 <= self.radius**2) & ~self_pair, shifts

    def _wrap(
        self, positions: Float[Array, "atoms 3"], cell: Float[Array, "3 3"]
    ) -> tuple[Float[Array, "atoms 3"], Float[Array, "atoms 3"]]:
        """Positions wrapped into the cell along periodic axes, and the lattice offsets `k` removed."""
        if not any(self.pbc):
            return positions, jnp.zeros_like(positions)
        # Partly periodic cells are full 3D (checked at allocation), so solving is safe.
        frac = jnp.linalg.solve(cell.T, positions.T).T
        k = jnp.where(jnp.asarray(self.pbc), jnp.floor(frac), 0.0)
        return positions - k @ cell, k

    def _build(
        self,
        positions,
        cell,
        capacity: int,
        image_range,
        minimum_image,
        overflow: bool | Bool[Array, ""] = False,
        grid: CellGrid | None = None,
    ) -> NeighborList:
        if grid is None:
            target, source, pair_shift, valid, count, full = self._all_pairs(
                positions, cell, capacity, image_range, minimum_image
            )
            if minimum_image:
                images_ok = self._minimum_image_ok(cell)
            else:
                images_ok = jnp.all(self._needed_range(cell) <= jnp.asarray(image_range))
        else:
            wrapped, _ = self._wrap(positions, cell)
            pairs = cell_list_pairs(wrapped, cell, self.pbc, self.radius, grid, capacity)
            target, source, pair_shift, valid, count, full = pairs
            images_ok = grid_still_valid(cell, self.pbc, self.radius, grid)
        last = positions.shape[0] - 1
        edge_index = jnp.stack([jnp.where(valid, source, last), jnp.where(valid, target, last)])
        # Back to the unwrapped positions: r = w + k H, so S' = S - (k_j - k_i).
        _, k_img = self._wrap(positions, cell)
        edge_shift = jnp.where(valid[:, None], pair_shift - (k_img[source] - k_img[target]), 0.0)
        return NeighborList(
            edge_index=edge_index.astype(jnp.int32),
            edge_shift=edge_shift,
            edge_mask=valid,
            reference_positions=positions,
            reference_cell=cell,
            num_candidates=count,
            did_buffer_overflow=jnp.asarray(overflow) | full | ~images_ok,
            image_range=image_range,
            minimum_image=minimum_image,
            grid=grid,
        )

    def _all_pairs(self, positions, cell, capacity: int, image_range, minimum_image):
        """The all-pairs search: `(target, source, wrapped-frame shift, valid, count, overflow)`."""
        mask, shifts = self._candidate_mask(positions, cell, image_range, minimum_image)
        shifts = jnp.broadcast_to(shifts, mask.shape + (3,))
        n, _, k = mask.shape
        count = jnp.sum(mask, dtype=jnp.int32)
        (flat,) = jnp.nonzero(mask.reshape(-1), size=capacity, fill_value=-1)
        valid = flat >= 0
        flat = jnp.where(valid, flat, 0)
        target, rest = flat // (n * k), flat % (n * k)
        source, image = rest // k, rest % k
        return target, source, shifts[target, source, image], valid, count, count > capacity

    def update(
        self,
        positions: Float[Array, "atoms 3"],
        neighbors: NeighborList,
        cell: Float[Array, "3 3"] | None = None,
    ) -> NeighborList:
        """Rebuild the list if needed (jit-able); keep it otherwise.

        **Arguments:**

        - `positions`: current Cartesian positions in Å.
        - `neighbors`: the list from `allocate` or a previous `update`.
        - `cell`: current lattice vectors as rows (default: the list's reference cell).

        **Returns:**

        The list, rebuilt when the Verlet bound says a pair may have entered the cutoff.
        `did_buffer_overflow` is sticky.
        """
        cell = neighbors.reference_cell if cell is None else cell
        moved = jnp.max(
            jnp.linalg.norm(self.unwrap(positions, neighbors, cell) - neighbors.reference_positions, axis=-1)
        )
        shifts = jnp.asarray(_image_shifts(neighbors.image_range), positions.dtype)  # |S| bound, both modes
        strained = jnp.max(jnp.linalg.norm(shifts @ (cell - neighbors.reference_cell), axis=-1))
        stale = 2.0 * moved + strained > self.skin
        return jax.lax.cond(
            stale,
            lambda: self._build(
                positions,
                cell,
                neighbors.capacity,
                neighbors.image_range,
                neighbors.minimum_image,
                neighbors.did_buffer_overflow,
                neighbors.grid,
            ),
            lambda: neighbors,
        )

    def unwrap(
        self, positions: Float[Array, "atoms 3"], neighbors: NeighborList, cell: Float[Array, "3 3"]
    ) -> Float[Array, "atoms 3"]:
        """Undo wraps into the cell since the last rebuild, so the stored image offsets apply.

        An integrator that wraps positions (JAX-MD's periodic `shift_fn`) moves an atom by a
        lattice vector `k H`; between rebuilds every atom moved less than half a cell width, so
        `k` is the rounded fractional displacement from the reference. Edge vectors, and so
        energies, are unchanged by this (it only picks the image the list was built for).

        **Arguments:**

        - `positions`: current Cartesian positions.
        - `neighbors`: the list.
        - `cell`: current lattice vectors as rows.

        **Returns:**

        `positions - k H`, continuous with `neighbors.reference_positions`.
        """
        if not any(self.pbc):
            return positions
        delta = jnp.linalg.solve(cell.T, (positions - neighbors.reference_positions).T).T
        k = jnp.where(jnp.asarray(self.pbc), jnp.round(jax.lax.stop_gradient(delta)), 0.0)
        return positions - k @ cell

    def graph_mask(
        self, neighbors: NeighborList, vectors: Float[Array, "capacity 3"]
    ) -> tuple[Bool[Array, " capacity"], Bool[Array, ""]]:
        """Which candidates are edges of fairchem's graph, and whether the cap is exceeded.

        **Arguments:**

        - `neighbors`: the list.
        - `vectors`: current edge vectors `r_j - r_i + S H` of the candidates.

        **Returns:**

        `(mask, over_cap)`: `mask` keeps candidates with `0 < d² <= cutoff²` (fairchem's
        inclusive cutoff, coincident pairs dropped); `over_cap` is True when some atom has
        more than `max_neighbors` such neighbours (fairchem would then apply its cap, which
        this list does not reproduce).
        """
        d2 = jnp.sum(vectors * vectors, axis=-1)
        mask = neighbors.edge_mask & (d2 <= self.cutoff**2) & (d2 > 0)
        if self.max_neighbors is None:
            return mask, jnp.asarray(False)
        counts = jax.ops.segment_sum(
            mask.astype(jnp.int32), neighbors.edge_index[1], num_segments=neighbors.reference_positions.shape[0]
        )
        return mask, jnp.any(counts > self.max_neighbors)


def _image_shifts(image_range: tuple[int, int, int]) -> Float[np.ndarray, "images 3"]:
    """All integer image offsets `S` with `|S_a| <= image_range[a]`, in lexicographic order."""
    ranges = [np.arange(-n, n + 1) for n in image_range]
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.astype(np.float64)
