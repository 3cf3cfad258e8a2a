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
