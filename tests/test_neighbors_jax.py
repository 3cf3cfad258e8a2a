"""In-jit neighbour list vs the host (vesin) graph: identical edge sets on random cells."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uma_eqx.neighbors import NeighborListFns, radius_graph

CUTOFF = 4.0


def _edges(nbrs, fns, positions, cell):
    vec = (
        positions[np.asarray(nbrs.edge_index[0])]
        - positions[np.asarray(nbrs.edge_index[1])]
        + np.asarray(nbrs.edge_shift) @ cell
    )
    mask, _ = fns.graph_mask(nbrs, jnp.asarray(vec))
    mask = np.asarray(mask)
    rows = np.concatenate([np.asarray(nbrs.edge_index).T[mask], np.asarray(nbrs.edge_shift)[mask].astype(int)], 1)
    return set(map(tuple, rows.tolist()))


def _host(positions, cell, pbc):
    ei, sh = radius_graph(positions, cell, pbc, CUTOFF, None)
    return set(map(tuple, np.concatenate([ei.T, sh], 1).tolist()))


@pytest.mark.parametrize("seed", range(8))
def test_same_edges_as_host_on_random_cells(seed):
    """Random triclinic cells, some narrower than 2x the cutoff, random pbc; then moved atoms."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 14))
    cell = rng.normal(size=(3, 3)) * 1.2 + np.eye(3) * rng.uniform(2.0, 7.0)
    pbc = tuple(bool(p) for p in rng.random(3) < 0.7)
    positions = rng.uniform(size=(n, 3)) @ cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=pbc, skin=0.6, max_neighbors=None)
    nbrs = fns.allocate(positions, cell)
    assert not bool(nbrs.did_buffer_overflow)
    assert _edges(nbrs, fns, positions, cell) == _host(positions, cell, pbc)

    # Move every atom by less than skin/2: update keeps the list, edges still exact.
    update = jax.jit(fns.update)
    small = positions + rng.normal(size=positions.shape) * 0.05
    kept = update(jnp.asarray(small), nbrs, jnp.asarray(cell))
    assert np.array_equal(np.asarray(kept.reference_positions), np.asarray(nbrs.reference_positions))
    assert _edges(kept, fns, small, cell) == _host(small, cell, pbc)
    # Move far: update rebuilds (inside jit), edges exact again (or overflow is flagged).
    far = positions + rng.normal(size=positions.shape) * 0.8
    rebuilt = update(jnp.asarray(far), nbrs, jnp.asarray(cell))
    assert np.allclose(np.asarray(rebuilt.reference_positions), far)
    if not bool(rebuilt.did_buffer_overflow):
        assert _edges(rebuilt, fns, far, cell) == _host(far, cell, pbc)


def test_sorted_by_target_and_padding_is_masked():
    rng = np.random.default_rng(3)
    cell = np.eye(3) * 6.0
    positions = rng.uniform(size=(10, 3)) @ cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), max_neighbors=None)
    nbrs = fns.allocate(positions, cell, extra_capacity=7)
    target = np.asarray(nbrs.edge_index[1])
    assert np.all(np.diff(target) >= 0)
    count = int(nbrs.num_candidates)
    assert nbrs.capacity >= count + 7
    assert not np.asarray(nbrs.edge_mask)[count:].any() and np.asarray(nbrs.edge_mask)[:count].all()


def test_overflow_is_flagged_not_silent():
    """Compress the cell: more candidates than slots must set did_buffer_overflow (sticky)."""
    rng = np.random.default_rng(1)
    cell = np.eye(3) * 8.0
    positions = rng.uniform(size=(12, 3)) @ cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), skin=0.3, capacity_multiplier=1.0, max_neighbors=None)
    nbrs = fns.allocate(positions, cell)
    squeezed = fns.update(jnp.asarray(positions * 0.7), nbrs, jnp.asarray(cell * 0.7))
    assert bool(squeezed.did_buffer_overflow)
    # A deformed cell that needs more periodic images also overflows.
    thin = np.diag([8.0, 8.0, 3.0])
    again = fns.update(jnp.asarray(positions @ np.linalg.inv(cell) @ thin), nbrs, jnp.asarray(thin))
    assert bool(again.did_buffer_overflow)
    # Sticky: a later harmless update keeps the flag.
    assert bool(fns.update(jnp.asarray(positions * 0.7), squeezed, jnp.asarray(cell * 0.7)).did_buffer_overflow)


def test_over_cap_is_reported():
    cell = np.eye(3) * 2.0  # 32 images of the atom within 4 Å
    positions = np.zeros((1, 3))
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), max_neighbors=10)
    nbrs = fns.allocate(positions, cell)
    vec = np.asarray(nbrs.edge_shift) @ cell
    _, over = fns.graph_mask(nbrs, jnp.asarray(vec))
    assert bool(over)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(positions=np.full((2, 3), np.nan), cell=np.eye(3)), "NaN or inf"),
        (dict(positions=np.zeros((2, 3)), cell=np.zeros((3, 3))), "volume"),
        (dict(positions=np.zeros((0, 3)), cell=np.eye(3)), "atoms >= 1"),
    ],
)
def test_bad_input(kwargs, match):
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True))
    with pytest.raises(ValueError, match=match):
        fns.allocate(**kwargs)


def test_bad_parameters():
    with pytest.raises(ValueError, match="cutoff"):
        NeighborListFns(cutoff=-1.0, pbc=(True, True, True))
    with pytest.raises(ValueError, match="skin"):
        NeighborListFns(cutoff=5.0, pbc=(True, True, True), skin=float("nan"))


@pytest.mark.parametrize("seed", range(3))
def test_minimum_image_mode_matches_host(seed):
    """Wide skewed cells (every width >= 2 (cutoff + skin)): one image per pair, same edges."""
    rng = np.random.default_rng(10 + seed)
    cell = np.eye(3) * 12.0 + rng.normal(size=(3, 3)) * 1.0
    positions = rng.uniform(-0.2, 1.2, size=(40, 3)) @ cell  # some atoms outside the cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), skin=0.5, max_neighbors=None)
    nbrs = fns.allocate(positions, cell)
    assert nbrs.minimum_image and not bool(nbrs.did_buffer_overflow)
    assert _edges(nbrs, fns, positions, cell) == _host(positions, cell, (True, True, True))
    # Shrinking the cell below 2 (cutoff + skin) invalidates the mode: flagged as overflow.
    small = cell * 0.8
    assert bool(fns.update(jnp.asarray(positions * 0.8), nbrs, jnp.asarray(small)).did_buffer_overflow)


@pytest.mark.parametrize("seed", range(10))
def test_cell_list_same_edges_and_order_as_host(seed):
    """The cell-list search: random triclinic cells (some narrower than the cutoff, some many bins
    wide), mixed pbc and molecules; identical edges, in the host graph's order; then moved atoms."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 160))
    scale = rng.uniform(2.0, 16.0)
    cell = rng.normal(size=(3, 3)) * 0.15 * scale + np.eye(3) * scale
    pbc = (False, False, False) if seed == 0 else tuple(bool(p) for p in rng.random(3) < 0.7)
    positions = rng.uniform(size=(n, 3)) @ cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=pbc, skin=0.6, max_neighbors=None, method="cell_list")
    nbrs = fns.allocate(positions, cell)
    assert nbrs.grid is not None and not bool(nbrs.did_buffer_overflow)
    assert _edges(nbrs, fns, positions, cell) == _host(positions, cell, pbc)
    # the candidates come sorted like the host graph (target, source, image)
    ei, sh = radius_graph(positions, cell, pbc, CUTOFF + 0.6, None)
    valid = np.asarray(nbrs.edge_mask)
    got = np.concatenate([np.asarray(nbrs.edge_index).T[valid][:, ::-1], np.asarray(nbrs.edge_shift)[valid]], 1)
    want = np.concatenate([ei.T[:, ::-1], sh], 1)
    want = want[np.lexsort((want[:, 4], want[:, 3], want[:, 2], want[:, 1], want[:, 0]))]
    np.testing.assert_array_equal(got[:, :2], want[:, :2])
    # same edges as the all-pairs search, in jit, after moving the atoms
    update = jax.jit(fns.update)
    far = positions + rng.normal(size=positions.shape) * 0.8
    rebuilt = update(jnp.asarray(far), nbrs, jnp.asarray(cell))
    if not bool(rebuilt.did_buffer_overflow):
        assert _edges(rebuilt, fns, far, cell) == _host(far, cell, pbc)


def test_cell_list_flags_a_full_bin():
    cell = np.eye(3) * 20.0
    rng = np.random.default_rng(0)
    positions = rng.uniform(size=(40, 3)) @ cell
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), max_neighbors=None, method="cell_list")
    nbrs = fns.allocate(positions, cell)
    crowded = positions.copy()
    crowded[:20] = crowded[0] + rng.normal(size=(20, 3)) * 0.3  # 20 atoms into one bin
    rebuilt = jax.jit(fns.update)(jnp.asarray(crowded), nbrs, jnp.asarray(cell))
    assert bool(rebuilt.did_buffer_overflow)
    assert fns.allocate(crowded, cell).grid.bin_capacity >= 20  # reallocation sizes the bins anew


def test_cell_list_is_chosen_for_large_systems():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((16, 16, 8))  # 8192 atoms
    fns = NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), max_neighbors=None)
    nbrs = fns.allocate(atoms.positions, atoms.cell[:])
    assert nbrs.grid is not None  # all pairs would be 8192² > MAX_PAIR_TABLE entries
    assert _edges(nbrs, fns, atoms.positions, atoms.cell[:]) == _host(atoms.positions, atoms.cell[:], (True,) * 3)
    with pytest.raises(ValueError, match="method='cell_list'"):
        NeighborListFns(cutoff=CUTOFF, pbc=(True, True, True), method="all_pairs").allocate(
            atoms.positions, atoms.cell[:]
        )
