"""Host-side (numpy + vesin) radius graph with fairchem's exact semantics."""

from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float, Int

from .._constants import MAX_NEIGHBORS, MAX_NEIGHBORS_TOLERANCE

#: vesin keeps pairs with `d < cutoff` (strict); fairchem keeps `d² <= cutoff²`. We ask
#: vesin for a slightly larger sphere and apply fairchem's inclusive test ourselves.
_VESIN_CUTOFF_SLACK = 1e-6


def import_vesin():
    """The `vesin` module, imported without torch and cupy when neither is loaded yet.

    vesin (0.6) imports torch and cupy at import when they are installed, only so that it can
    also take their tensors; uma_eqx hands it numpy arrays, and importing torch costs a fresh
    process a second or more (most of a warm-cache start). So they are hidden from vesin's
    first import (`sys.modules[name] = None` makes `import name` raise `ImportError`, which
    vesin treats as "not installed") and restored right after. A process that already
    imported torch keeps vesin's torch support.
    """
    import sys

    if "vesin" in sys.modules:
        return sys.modules["vesin"]
    hidden = [name for name in ("torch", "cupy") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import vesin
    finally:
        for name in hidden:
            del sys.modules[name]
    return vesin


def radius_graph(
    positions: Float[np.ndarray, "atoms 3"],
    cell: Float[np.ndarray, "3 3"],
    pbc: Bool[np.ndarray, "3"] | Sequence[bool] | bool,
    cutoff: float,
    max_neighbors: int | None = MAX_NEIGHBORS,
) -> tuple[Int[np.ndarray, "2 edges"], Int[np.ndarray, "edges 3"]]:
    """Directed radius graph of one system, periodic images included.

    Port of `fairchem.core.graph.radius_graph_pbc.radius_graph_pbc_v2` (with
    `enforce_max_neighbors_strictly=False`) followed by the zero-distance filter of
    `fairchem.core.graph.compute.get_pbc_distances`, computed with
    [vesin](https://github.com/Luthaf/vesin) on the host.

    An edge `(j, i, S)` (source `j`, target `i`, integer image offset `S`) is kept when

    $$0 < \\lVert r_j - r_i + S\\,H \\rVert^2 \\le r_c^2,$$

    where the rows of `H = cell` are the lattice vectors and `S` is zero along
    non-periodic axes. The cutoff is **inclusive** and computed in float64; pairs at
    distance 0 (an atom with itself, coincident atoms) are dropped. Every periodic image
    is found, also when the cell is smaller than the cutoff or strongly skewed.

    Neighbour cap (fairchem's `get_max_neighbors_mask`): an atom with more than
    `max_neighbors` neighbours keeps every neighbour with
    `d² <= d²_(max_neighbors) + 0.01 Å²`, where `d²_(k)` is its `k`-th smallest squared
    distance (0-based, so the `max_neighbors + 1`-th nearest). Ties are never split,
    so such an atom keeps at least `max_neighbors + 1` neighbours. Atoms at or below the
    cap keep all of theirs.

    Edges are sorted by target `i`, then source `j`, then `S` (lexicographically), so
    the output is deterministic. fairchem also groups edges by target; its order within
    a target follows its internal spatial grid (and an unstable sort) and is not
    reproduced.

    **Arguments:**

    - `positions`: Cartesian positions in Å. They need not be wrapped into the cell.
    - `cell`: lattice vectors as rows. Ignored along non-periodic axes; must have
        non-zero volume when any axis is periodic.
    - `pbc`: periodicity per axis (or one bool for all three).
    - `cutoff`: radius in Å, `> 0`.
    - `max_neighbors`: neighbour cap as above; `None` disables it (fairchem: `<= 0`).

    **Returns:**

    A tuple `(edge_index, shifts)`: `edge_index[0]` the source `j`, `edge_index[1]` the
    target `i` (int64), and `shifts` the integer image offsets `S` (int64), such that
    the edge vector is `positions[j] - positions[i] + shifts @ cell`.
    """
    vesin = import_vesin()

    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    _check_inputs(positions, cell, pbc, cutoff, max_neighbors)

    num_atoms = positions.shape[0]
    if num_atoms == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64)

    # vesin ignores `box` along non-periodic axes (checked for all-False and mixed pbc).
    box = cell if pbc.any() else np.eye(3)
    calculator = vesin.NeighborList(cutoff=float(cutoff) * (1.0 + _VESIN_CUTOFF_SLACK), full_list=True)
    # vesin convention: vector = points[j] - points[i] + S @ box, i.e. i is fairchem's
    # target and j its source.
    target, source, shifts = calculator.compute(points=positions, box=box, periodic=pbc, quantities="ijS")
    target = target.astype(np.int64)
    source = source.astype(np.int64)
    shifts = shifts.astype(np.int64)
    shifts[:, ~pbc] = 0  # already so; make the non-periodic convention explicit

    vectors = positions[source] - positions[target] + shifts @ cell
    dist_sq = np.einsum("ed,ed->e", vectors, vectors)
    keep = (dist_sq <= float(cutoff) ** 2) & (dist_sq != 0.0)
    target, source, shifts, dist_sq = (target[keep], source[keep], shifts[keep], dist_sq[keep])

    if max_neighbors is not None:
        keep = _max_neighbors_mask(target, dist_sq, num_atoms, max_neighbors)
        target, source, shifts = target[keep], source[keep], shifts[keep]

    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], source, target))
    edge_index = np.stack([source[order], target[order]])
    return edge_index, shifts[order]


def _max_neighbors_mask(
    target: Int[np.ndarray, " edges"],
    dist_sq: Float[np.ndarray, " edges"],
    num_atoms: int,
    max_neighbors: int,
) -> Bool[np.ndarray, " edges"]:
    """fairchem's `get_max_neighbors_mask(enforce_max_strictly=False)`, one system."""
    counts = np.bincount(target, minlength=num_atoms)
    if counts.size == 0 or counts.max() <= max_neighbors:
        return np.ones(target.shape, dtype=bool)
    # Sort by (target, d²); the (max_neighbors)-th entry of each crowded atom's run is
    # its threshold distance.
    order = np.lexsort((dist_sq, target))
    starts = np.cumsum(counts) - counts
    crowded = counts > max_neighbors
    threshold = np.full(num_atoms, np.inf)
    threshold[crowded] = dist_sq[order][starts[crowded] + max_neighbors] + MAX_NEIGHBORS_TOLERANCE
    return dist_sq <= threshold[target]


def _check_inputs(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    max_neighbors: int | None,
) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"`positions` must have shape (atoms, 3), got {positions.shape}.")
    if cell.shape != (3, 3):
        raise ValueError(f"`cell` must have shape (3, 3), got {cell.shape}.")
    if not np.all(np.isfinite(positions)):
        bad = np.argwhere(~np.isfinite(positions))[0]
        raise ValueError(f"`positions` must be finite, got {positions[bad[0]]} for atom {bad[0]}.")
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"`cutoff` must be a positive finite number, got {cutoff}.")
    if max_neighbors is not None and (
        isinstance(max_neighbors, bool) or not isinstance(max_neighbors, (int, np.integer)) or max_neighbors < 1
    ):
        raise ValueError(f"`max_neighbors` must be a positive int, got {max_neighbors!r}; pass None for no cap.")
    if pbc.any():
        if not np.all(np.isfinite(cell)):
            raise ValueError(f"`cell` must be finite, got {cell.tolist()}.")
        volume = abs(float(np.linalg.det(cell)))
        if volume == 0.0 or not np.isfinite(volume):
            raise ValueError(
                f"`cell` {cell.tolist()} has volume {volume}, but pbc={pbc.tolist()} "
                "needs a non-degenerate cell; give it three independent lattice "
                "vectors or set pbc=False."
            )
