"""Tests for `uma_eqx._graph` and `uma_eqx.neighbors` (host radius graph).

fairchem's own graph builder (`AtomicData.from_ase` + `generate_graph` with
`radius_pbc_version=2`, as the UMA model runs it at inference) is the oracle where torch
and fairchem are installed; a brute-force numpy search is the torch-free oracle.
"""

import math

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule

from uma_eqx._graph import AtomicGraph, PaddingSpec, bucket_size, pad_graph
from uma_eqx.neighbors import radius_graph

CUTOFF = 6.0
FAR = CUTOFF + 1.0
DATASETS = ("oc20", "omat", "omol", "odac", "omc")
#: Edge vectors: float32 graph vs fairchem's float64 graph (|r| up to ~25 Å).
VECTOR_ATOL_F32 = 2e-5
VECTOR_ATOL_F64 = 1e-10


# ---------------------------------------------------------------- structures


def _random_atoms(rng, n, cell, pbc, low=-0.3, high=1.3, min_dist=0.7):
    """`n` atoms at random fractional coordinates in [low, high), some outside."""
    cell = np.asarray(cell, dtype=np.float64)
    positions = []
    while len(positions) < n:
        p = rng.uniform(low, high, size=3) @ cell
        if all(np.linalg.norm(p - q) > min_dist for q in positions):
            positions.append(p)
    numbers = rng.integers(1, 90, size=n)
    return ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)


def _structures():
    rng = np.random.default_rng(1234)
    cases = {}
    cases["cubic"] = _random_atoms(rng, 24, np.eye(3) * 8.0, True)
    # Cell shorter than the cutoff along every axis: many images of each atom.
    cases["small_cell"] = _random_atoms(rng, 2, [[2.2, 0, 0], [0.3, 2.4, 0], [0.2, 0.4, 2.6]], True, 0, 1, 0.3)
    # Strongly skewed triclinic cell (angles far from 90 degrees).
    cases["skewed"] = _random_atoms(rng, 6, [[4.0, 0, 0], [3.8, 3.0, 0], [3.5, 2.6, 3.2]], True, 0, 1, 0.5)
    cases["left_handed"] = _random_atoms(rng, 5, [[0, 4.5, 0], [4.0, 0, 0], [0.5, 0.3, 5.0]], True)
    # Mixed pbc: a slab, atoms outside the cell along both kinds of axes.
    cases["slab"] = _random_atoms(rng, 10, [[6.0, 0, 0], [2.0, 5.5, 0], [0, 0, 12.0]], [True, True, False])
    cases["wire"] = _random_atoms(rng, 6, [[10.0, 0, 0], [0, 10.0, 0], [0, 0, 3.1]], [False, False, True])
    molecule_ = _random_atoms(rng, 12, np.eye(3) * 7.0, False, 0, 1)
    molecule_.set_cell(np.zeros((3, 3)))
    cases["molecule"] = molecule_
    coincident = molecule("CH4")
    coincident += ase.Atoms("H", positions=[coincident.positions[1]])
    cases["coincident_atoms"] = coincident
    # Exactly at the cutoff: 6 images at 6.0 Å (inclusive), and in a 3 Å cell the
    # shells up to |n|^2 = 4 (32 images; strict < would give 26).
    cases["images_at_cutoff"] = ase.Atoms("Cu", cell=np.eye(3) * 6.0, pbc=True)
    cases["images_at_half_cutoff"] = ase.Atoms("Cu", cell=np.eye(3) * 3.0, pbc=True)
    cases["pair_at_cutoff"] = ase.Atoms("H4", positions=[[0, 0, 0], [6.0, 0, 0], [0, 0, 6.0001], [3.0, 4.0, 0]])
    cases["fcc_supercell"] = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    return cases


STRUCTURES = _structures()


def _edge_keys(edge_index, shifts):
    """Rows (source, target, sx, sy, sz) and the order that sorts them."""
    keys = np.concatenate([np.asarray(edge_index).T, np.rint(np.asarray(shifts))], axis=1).astype(np.int64)
    order = np.lexsort(keys.T[::-1])
    return keys[order], order


def _real_edges(graph):
    mask = np.asarray(graph.edge_mask)
    return np.asarray(graph.edge_index)[:, mask], np.asarray(graph.edge_shift)[mask]


def _brute_force(positions, cell, pbc, cutoff):
    """All (source, target, shift) with 0 < d <= cutoff, over generously many images."""
    positions = np.asarray(positions, np.float64)
    cell = np.asarray(cell, np.float64)
    reps = []
    for axis in range(3):
        if pbc[axis]:
            recip = np.linalg.inv(cell).T[axis]
            extent = np.ptp(positions @ np.linalg.inv(cell)[:, axis])
            reps.append(int(math.ceil(cutoff * np.linalg.norm(recip) + extent)) + 1)
        else:
            reps.append(0)
    ranges = [np.arange(-r, r + 1) for r in reps]
    images = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    vec = (
        positions[None, :, None, :] - positions[:, None, None, :] + (images @ cell)[None, None, :, :]
    )  # [target, source, image, 3]
    d2 = np.einsum("tsid,tsid->tsi", vec, vec)
    t, s, i = np.nonzero((d2 <= cutoff**2) & (d2 != 0))
    return np.stack([s, t]), images[i]


# ------------------------------------------------------- radius_graph, torch-free


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_radius_graph_matches_brute_force(name):
    atoms = STRUCTURES[name]
    cell = np.asarray(atoms.get_cell(complete=True))
    pos = atoms.get_positions()
    if atoms.pbc.any():
        pos = ase.geometry.wrap_positions(pos, cell, pbc=atoms.pbc, eps=0)
    edge_index, shifts = radius_graph(pos, cell, atoms.pbc, CUTOFF, max_neighbors=None)
    expected_index, expected_shifts = _brute_force(pos, cell, atoms.pbc, CUTOFF)
    ours, _ = _edge_keys(edge_index, shifts)
    expected, _ = _edge_keys(expected_index, expected_shifts)
    np.testing.assert_array_equal(ours, expected)
    assert edge_index.dtype == np.int64 and shifts.dtype == np.int64
    assert np.all(np.diff(edge_index[1]) >= 0), "edges must be grouped by target"
    assert np.all(shifts[:, ~atoms.pbc] == 0)


def test_radius_graph_boundary_counts():
    one = np.zeros((1, 3))
    assert radius_graph(one, np.eye(3) * 6.0, True, 6.0)[0].shape[1] == 6
    assert radius_graph(one, np.eye(3) * 3.0, True, 6.0)[0].shape[1] == 32
    # Slightly beyond the cutoff: excluded.
    assert radius_graph(one, np.eye(3) * 6.000001, True, 6.0)[0].shape[1] == 0


def test_radius_graph_unwrapped_positions_give_same_vectors():
    atoms = STRUCTURES["skewed"]
    cell = np.asarray(atoms.cell)
    pos = atoms.get_positions() + np.array([2, -3, 1]) @ cell
    edge_index, shifts = radius_graph(pos, cell, True, CUTOFF, None)
    wrapped = ase.geometry.wrap_positions(pos, cell, eps=0)
    w_index, w_shifts = radius_graph(wrapped, cell, True, CUTOFF, None)
    vec = pos[edge_index[0]] - pos[edge_index[1]] + shifts @ cell
    w_vec = wrapped[w_index[0]] - wrapped[w_index[1]] + w_shifts @ cell

    def sorted_rows(index, vectors):
        rows = np.concatenate([index.T, np.round(vectors, 6)], axis=1)
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_allclose(sorted_rows(edge_index, vec), sorted_rows(w_index, w_vec), atol=1e-9)


def _max_neighbors_loop(edge_index, d2, num_atoms, max_neighbors):
    """fairchem's rule written as a plain per-atom loop."""
    keep = np.ones(len(d2), dtype=bool)
    for atom in range(num_atoms):
        mine = np.nonzero(edge_index[1] == atom)[0]
        if len(mine) > max_neighbors:
            threshold = np.sort(d2[mine])[max_neighbors] + 0.01
            keep[mine] = d2[mine] <= threshold
    return keep


@pytest.mark.parametrize("max_neighbors", [1, 12, 13, 20, 50])
@pytest.mark.parametrize("rattle", [0.0, 0.05])
def test_radius_graph_max_neighbors_rule(max_neighbors, rattle):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(rattle, seed=3)
    pos = ase.geometry.wrap_positions(atoms.positions, atoms.cell, eps=0)
    cell = atoms.cell[:]
    full, full_shifts = radius_graph(pos, cell, True, CUTOFF, None)
    capped, capped_shifts = radius_graph(pos, cell, True, CUTOFF, max_neighbors)
    vec = pos[full[0]] - pos[full[1]] + full_shifts @ cell
    keep = _max_neighbors_loop(full, np.sum(vec**2, -1), len(atoms), max_neighbors)
    np.testing.assert_array_equal(
        _edge_keys(capped, capped_shifts)[0],
        _edge_keys(full[:, keep], full_shifts[keep])[0],
    )
    counts = np.bincount(capped[1], minlength=len(atoms))
    assert counts.min() >= max_neighbors + 1  # ties are never split


def test_radius_graph_errors():
    one = np.zeros((1, 3))
    with pytest.raises(ValueError, match="max_neighbors.*0"):
        radius_graph(one, np.eye(3), True, 6.0, max_neighbors=0)
    with pytest.raises(ValueError, match="volume"):
        radius_graph(one, np.zeros((3, 3)), [True, False, False], 6.0)
    with pytest.raises(ValueError, match="cutoff.*-1"):
        radius_graph(one, np.eye(3), False, -1.0)
    with pytest.raises(ValueError, match="nan"):
        radius_graph(np.full((1, 3), np.nan), np.eye(3), False, 6.0)
    empty_index, empty_shifts = radius_graph(np.zeros((0, 3)), np.eye(3), False, 6.0)
    assert empty_index.shape == (2, 0) and empty_shifts.shape == (0, 3)


# -------------------------------------------------------- AtomicGraph, torch-free


def _graph(atoms, task_name="omat", **kwargs):
    return AtomicGraph.from_atoms(atoms, cutoff=CUTOFF, datasets=DATASETS, task_name=task_name, **kwargs)


def test_from_atoms_fields():
    atoms = STRUCTURES["slab"]
    graph = _graph(atoms)
    assert graph.positions.dtype == jnp.float32
    assert graph.num_systems == 1 and graph.num_atoms == len(atoms)
    np.testing.assert_array_equal(graph.atomic_numbers, atoms.numbers)
    np.testing.assert_array_equal(graph.system_index, np.zeros(len(atoms)))
    np.testing.assert_allclose(graph.cell[0], atoms.cell[:])
    assert int(graph.dataset_index[0]) == DATASETS.index("omat")
    assert bool(graph.atom_mask.all() & graph.edge_mask.all() & graph.system_mask.all())
    np.testing.assert_array_equal(graph.num_atoms_per_system, [len(atoms)])
    # Edge vectors follow pos[j] - pos[i] + S @ cell and lie within the cutoff.
    source, target = np.asarray(graph.edge_index)
    pos, cell = np.asarray(graph.positions, np.float64), np.asarray(atoms.cell)
    expected = pos[source] - pos[target] + np.asarray(graph.edge_shift) @ cell
    vectors = np.asarray(graph.edge_vectors(FAR))
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert np.all(np.linalg.norm(vectors, axis=-1) <= CUTOFF + 1e-5)
    assert np.all(np.diff(target) >= 0)


def test_positions_wrapped_along_periodic_axes_only():
    atoms = ase.Atoms(
        "H2",
        positions=[[-1.0, 7.0, -3.0], [2.0, 2.0, 20.0]],
        cell=np.eye(3) * 5.0,
        pbc=[True, True, False],
    )
    graph = _graph(atoms)
    np.testing.assert_allclose(graph.positions, [[4.0, 2.0, -3.0], [2.0, 2.0, 20.0]])


def test_molecule_gets_identity_cell():
    graph = _graph(molecule("H2O"), task_name="omol")
    np.testing.assert_array_equal(graph.cell, np.eye(3)[None])
    assert np.all(np.asarray(graph.edge_shift) == 0)


def test_no_edges_gives_one_masked_fake_edge():
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 10.0]])
    graph = _graph(atoms)
    np.testing.assert_array_equal(graph.edge_index, [[0], [0]])
    assert not bool(graph.edge_mask[0])
    np.testing.assert_array_equal(graph.edge_vectors(FAR), [[FAR, FAR, FAR]])


def test_batch_equals_concatenated_systems():
    names = ["cubic", "slab", "molecule", "small_cell"]
    tasks = ["omat", "oc20", "omol", "omc"]
    batch = _graph([STRUCTURES[n] for n in names], task_name=tasks)
    atom_offset, edge_offset = 0, 0
    for k, name in enumerate(names):
        single = _graph(STRUCTURES[name])
        n, e = single.num_atoms, single.num_edges
        sl = slice(atom_offset, atom_offset + n)
        np.testing.assert_array_equal(batch.positions[sl], single.positions)
        np.testing.assert_array_equal(batch.system_index[sl], k)
        np.testing.assert_array_equal(
            batch.edge_index[:, edge_offset : edge_offset + e],
            single.edge_index + atom_offset,
        )
        np.testing.assert_array_equal(batch.edge_shift[edge_offset : edge_offset + e], single.edge_shift)
        atom_offset, edge_offset = atom_offset + n, edge_offset + e
    assert edge_offset == batch.num_edges
    np.testing.assert_array_equal(batch.dataset_index, [1, 0, 2, 4])


@pytest.mark.parametrize(
    "task, info, expected",
    [
        ("omol", {}, (0, 1)),
        ("omat", {}, (0, 0)),
        ("oc20", {}, (0, 0)),
        ("omol", {"charge": -2, "spin": 3}, (-2, 3)),
        ("omat", {"charge": np.int64(1)}, (1, 0)),
        ("omol", {"spin": 0}, (0, 0)),
        ("omol", {"charge": 100, "spin": 100}, (100, 100)),
    ],
)
def test_charge_spin_defaults(task, info, expected):
    atoms = molecule("H2O")
    atoms.info.update(info)
    graph = _graph(atoms, task_name=task)
    assert (int(graph.charge[0]), int(graph.spin[0])) == expected
    assert "spin" not in info or atoms.info["spin"] == info["spin"]
    assert set(atoms.info) == set(info), "atoms.info must not be modified"


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: ase.Atoms(), {}, "no atoms"),
        (lambda: [], {}, "empty"),
        (
            lambda: ase.Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]),
            {},
            r"non-finite position \[nan, 0.0, 0.0\] at atom 1",
        ),
        (lambda: ase.Atoms("H", pbc=True), {}, r"periodic along all axes.*volume 0"),
        (
            lambda: ase.Atoms("H", cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True),
            {},
            "volume 0",
        ),
        (
            lambda: ase.Atoms("H", cell=[5.0, 5.0, 0.0], pbc=[True, True, False]),
            {},
            r"pbc=\[True, True, False\].*volume 0.*0.1",
        ),
        (lambda: molecule("H2O"), {"task_name": "omatt"}, r"'omatt'.*\['oc20', 'omat'"),
        (lambda: molecule("H2O"), {"task_name": ["omat", "omol"]}, "one str per"),
        (
            lambda: ase.Atoms("H", info={"charge": 101}),
            {},
            r"'charge'\] = 101.*\[-100, 100\]",
        ),
        (lambda: ase.Atoms("H", info={"spin": -1}), {}, r"'spin'\] = -1.*\[0, 100\]"),
        (
            lambda: ase.Atoms("H", info={"charge": 1.0}),
            {},
            r"'charge'\] = 1.0 \(float\).*int in \[-100, 100\]",
        ),
        (lambda: ase.Atoms("H", info={"spin": "2"}), {}, r"'spin'\] = '2' \(str\)"),
        (lambda: ase.Atoms("H", info={"charge": float("nan")}), {}, r"'charge'\] = nan \(float\)"),
        (lambda: ase.Atoms("H", info={"spin": 1.5}), {}, r"'spin'\] = 1.5 \(float\)"),
        (lambda: molecule("H2O"), {"pad": "yes"}, r"pad.*'yes'"),
        # atoms closer than MIN_ATOM_DISTANCE: coincident, nearly so, through a periodic image
        (lambda: ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]]), {}, r"atoms 0 and 1 are 0 Å apart.*0.1 Å"),
        (lambda: ase.Atoms("H2", positions=[[0, 0, 0], [0.05, 0, 0]]), {}, r"atoms 0 and 1 are 0.05 Å apart"),
        (
            lambda: ase.Atoms("Cu2", positions=[[0, 0, 0], [3.59, 0, 0]], cell=[3.6, 3.6, 3.6], pbc=True),
            {},
            r"atoms 0 and 1 are 0.01 Å apart \(closest pair, counting periodic images\)",
        ),
        # a non-finite cell, periodic or not
        (lambda: ase.Atoms("H", cell=[[np.inf, 0, 0], [0, 5, 0], [0, 0, 5]], pbc=True), {}, "non-finite cell"),
        (lambda: ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=[np.nan, 5, 5]), {}, "non-finite cell"),
    ],
)
def test_from_atoms_errors(make, kwargs, match):
    kwargs = {"task_name": "omat", **kwargs}
    with pytest.raises(ValueError, match=match):
        AtomicGraph.from_atoms(make(), cutoff=CUTOFF, datasets=DATASETS, **kwargs)


def test_min_distance_check_can_be_turned_off():
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.05, 0, 0]])
    graph = AtomicGraph.from_atoms(atoms, cutoff=CUTOFF, datasets=DATASETS, task_name="omat", min_distance=None)
    assert graph.num_edges == 2
    # H2 at its bond length passes the default check
    AtomicGraph.from_atoms(molecule("H2"), cutoff=CUTOFF, datasets=DATASETS, task_name="omat")


def test_stack_graphs_has_a_leading_axis():
    from uma_eqx import stack_graphs

    spec = PaddingSpec(num_atoms=16, num_edges=256, num_systems=3)
    graphs = [
        AtomicGraph.from_atoms(m, cutoff=CUTOFF, datasets=DATASETS, task_name="omat", pad=spec)
        for m in (molecule("H2O"), molecule("CH4"))
    ]
    stacked = stack_graphs(graphs)
    assert stacked.batch_shape == (2,) and stacked.num_atoms == 16 and stacked.num_edges == 256
    np.testing.assert_array_equal(stacked.edge_index[1], graphs[1].edge_index)
    lengths = jax.vmap(lambda g: jnp.linalg.norm(g.edge_vectors(far=7.0), axis=-1))(stacked)
    np.testing.assert_allclose(lengths[0], jnp.linalg.norm(graphs[0].edge_vectors(far=7.0), axis=-1))
    with pytest.raises(ValueError, match="leading axes"):
        stacked.edge_vectors(far=7.0)
    with pytest.raises(ValueError, match="pad them to common sizes"):
        stack_graphs(
            [graphs[0], AtomicGraph.from_atoms(molecule("H2O"), cutoff=CUTOFF, datasets=DATASETS, task_name="omat")]
        )


def test_bucket_size():
    expected = [1, 1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20]
    assert [bucket_size(n) for n in range(18)] == expected
    assert [bucket_size(n) for n in (300, 1000, 1025)] == [320, 1024, 1280]
    sizes = [bucket_size(n) for n in range(1, 5000)]
    assert all(s >= n for n, s in zip(range(1, 5000), sizes))
    assert all(s <= 1.25 * n for n, s in zip(range(1, 5000), sizes))
    assert all(bucket_size(s) == s for s in sizes)
    assert len(set(sizes)) <= 8 + 4 * 10  # four buckets per doubling
    with pytest.raises(ValueError, match="-1"):
        bucket_size(-1)


def _assert_same_real_content(padded, graph):
    n, e, s = graph.num_atoms, graph.num_edges, graph.num_systems
    for name in ("positions", "atomic_numbers", "system_index", "atom_mask"):
        np.testing.assert_array_equal(getattr(padded, name)[:n], getattr(graph, name))
    np.testing.assert_array_equal(padded.edge_index[:, :e], graph.edge_index)
    np.testing.assert_array_equal(padded.edge_shift[:e], graph.edge_shift)
    np.testing.assert_array_equal(padded.edge_mask[:e], graph.edge_mask)
    for name in ("cell", "charge", "spin", "dataset_index", "system_mask"):
        np.testing.assert_array_equal(getattr(padded, name)[:s], getattr(graph, name))
    np.testing.assert_array_equal(padded.edge_vectors(FAR)[:e], graph.edge_vectors(FAR))


def test_padding_bucketed():
    structures = [STRUCTURES["cubic"], molecule("H2O")]
    graph = _graph(structures, task_name=["omat", "omol"])
    padded = _graph(structures, task_name=["omat", "omol"], pad=True)
    n, e, s = graph.num_atoms, graph.num_edges, graph.num_systems
    assert padded.num_atoms == bucket_size(n + 1) or padded.num_atoms == bucket_size(n)
    assert padded.num_edges == bucket_size(e)
    assert padded.num_systems == bucket_size(s + 1)
    _assert_same_real_content(padded, graph)
    # Masks and padded values.
    assert int(padded.atom_mask.sum()) == n and int(padded.edge_mask.sum()) == e
    np.testing.assert_array_equal(padded.system_mask, [True, True, False])
    np.testing.assert_array_equal(padded.system_index[n:], padded.num_systems - 1)
    np.testing.assert_array_equal(padded.atomic_numbers[n:], 0)
    np.testing.assert_array_equal(padded.edge_index[:, e:], padded.num_atoms - 1)
    assert not bool(padded.atom_mask[-1])
    np.testing.assert_array_equal(padded.cell[s:], np.eye(3)[None])
    np.testing.assert_array_equal(padded.num_atoms_per_system, [24, 3, 0])
    np.testing.assert_array_equal(padded.edge_vectors(FAR)[e:], FAR)
    assert np.all(np.diff(np.asarray(padded.edge_index[1])) >= 0)


def test_padding_fixed_sizes_and_repadding():
    graph = _graph(STRUCTURES["skewed"])
    spec = PaddingSpec(num_atoms=16, num_edges=4096, num_systems=2)
    padded = _graph(STRUCTURES["skewed"], pad=spec)
    assert (padded.num_atoms, padded.num_edges, padded.num_systems) == (16, 4096, 2)
    _assert_same_real_content(padded, graph)
    # Padding a padded graph reuses its padded system and atom.
    again = pad_graph(padded, 20, 5000, 2)
    _assert_same_real_content(again, padded)
    np.testing.assert_array_equal(again.system_index[6:], 1)
    np.testing.assert_array_equal(again.edge_index[:, graph.num_edges : 4096], 15)
    np.testing.assert_array_equal(again.edge_index[:, 4096:], 19)
    # Exact sizes: no padding at all.
    same = pad_graph(graph, graph.num_atoms, graph.num_edges, 1)
    _assert_same_real_content(same, graph)


def test_padding_errors():
    graph = _graph(STRUCTURES["skewed"])
    n, e = graph.num_atoms, graph.num_edges
    with pytest.raises(ValueError, match=f"num_atoms=3 must be an int >= .* {n}"):
        pad_graph(graph, 3, e, 1)
    with pytest.raises(ValueError, match="padded system.*num_systems >= 2"):
        pad_graph(graph, n + 2, e, 1)
    with pytest.raises(ValueError, match=f"padded atom.*num_atoms >= {n + 1}"):
        pad_graph(graph, n, e + 5, 2)
    with pytest.raises(ValueError, match="num_edges.*4"):
        _graph(STRUCTURES["skewed"], pad=PaddingSpec(num_edges=4))
    with pytest.raises(ValueError, match=r"PaddingSpec.num_atoms.*0"):
        PaddingSpec(num_atoms=0)


def test_edge_vectors_nan_safe_gradients():
    graph = _graph([STRUCTURES["molecule"], STRUCTURES["small_cell"]], pad=True)

    def total_length(positions):
        g = eqx.tree_at(lambda g: g.positions, graph, positions)
        vectors = g.edge_vectors(FAR)
        return jnp.sum(jnp.linalg.norm(vectors, axis=-1))

    with jax.debug_nans(True):
        value, grad = jax.jit(jax.value_and_grad(total_length))(graph.positions)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~np.asarray(graph.atom_mask)], 0.0)


def test_graph_jit_and_shape_check():
    graph = _graph(STRUCTURES["cubic"], pad=True)
    counts = jax.jit(lambda g: g.num_atoms_per_system)(graph)
    np.testing.assert_array_equal(counts, [24, 0])
    with pytest.raises(ValueError, match="charge has shape"):
        eqx.tree_at(lambda g: g.charge, graph, jnp.zeros(5, jnp.int32)).__check_init__()


# ---------------------------------------------------------------- fairchem oracle


def _fairchem_graph(structures, tasks, max_neighbors=300, double=True):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fairchem.core")
    from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
    from fairchem.core.graph.compute import generate_graph

    dtype = torch.float64 if double else torch.float32
    data = [
        AtomicData.from_ase(a, task_name=t, r_data_keys=["spin", "charge"], target_dtype=dtype)
        for a, t in zip(structures, tasks)
    ]
    batch = atomicdata_list_to_batch(data)
    out = generate_graph(
        batch,
        cutoff=CUTOFF,
        max_neighbors=max_neighbors,
        enforce_max_neighbors_strictly=False,
        radius_pbc_version=2,
        pbc=batch.pbc,
    )
    return batch, {k: v.numpy() for k, v in out.items()}


def _compare_with_fairchem(structures, tasks, max_neighbors=300, double=True):
    batch, reference = _fairchem_graph(structures, tasks, max_neighbors, double)
    # fairchem's edge semantics, also for atoms closer than our `min_distance` (it drops
    # zero-length edges; `from_atoms` refuses such structures by default)
    graph = _graph(structures, task_name=tasks, max_neighbors=max_neighbors, min_distance=None)

    ours, our_order = _edge_keys(*_real_edges(graph))
    theirs, their_order = _edge_keys(reference["edge_index"], reference["cell_offsets"])
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(
        np.asarray(graph.edge_vectors(FAR))[np.asarray(graph.edge_mask)][our_order],
        reference["edge_distance_vec"][their_order],
        atol=VECTOR_ATOL_F32,
    )
    np.testing.assert_allclose(graph.positions, batch.pos.numpy(), atol=1e-5)
    np.testing.assert_allclose(graph.cell, batch.cell.numpy(), atol=1e-6)
    np.testing.assert_array_equal(graph.atomic_numbers, batch.atomic_numbers.numpy())
    np.testing.assert_array_equal(graph.system_index, batch.batch.numpy())
    # fairchem also groups by target.
    assert np.all(np.diff(reference["edge_index"][1]) >= 0)
    return graph, reference


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_edges_match_fairchem(name):
    _compare_with_fairchem([STRUCTURES[name]], ["omat"])


@pytest.mark.parametrize(
    "name",
    ["images_at_cutoff", "images_at_half_cutoff", "pair_at_cutoff", "fcc_supercell"],
)
def test_edges_match_fairchem_float32(name):
    """Exactly representable boundary cases agree with fairchem's float32 graph too."""
    _compare_with_fairchem([STRUCTURES[name]], ["omat"], double=False)


def test_cutoff_is_inclusive_like_fairchem():
    graph, _ = _compare_with_fairchem([STRUCTURES["pair_at_cutoff"]], ["omol"])
    lengths = np.linalg.norm(np.asarray(graph.edge_vectors(FAR)), axis=-1)
    assert np.isclose(lengths, CUTOFF).sum() == 2  # 0 <-> 1 both ways
    assert graph.num_edges == 6  # 0-1, 0-3, 1-3 both ways; 0-2 is 1e-4 Å beyond
    graph, _ = _compare_with_fairchem([STRUCTURES["images_at_half_cutoff"]], ["omat"])
    assert graph.num_edges == 32


def test_mixed_batch_matches_fairchem():
    names = ["cubic", "slab", "molecule", "small_cell", "wire", "skewed"]
    tasks = ["omat", "oc20", "omol", "omat", "omc", "odac"]
    _compare_with_fairchem([STRUCTURES[n] for n in names], tasks)


@pytest.mark.parametrize("max_neighbors", [1, 12, 13, 30])
@pytest.mark.parametrize("rattle", [0.0, 0.05])
def test_max_neighbors_matches_fairchem(max_neighbors, rattle):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(rattle, seed=5)
    _compare_with_fairchem([atoms, molecule("C6H6")], ["omat", "omol"], max_neighbors)


def test_dense_system_over_300_neighbors_matches_fairchem():
    rng = np.random.default_rng(7)
    atoms = ase.Atoms(
        numbers=np.full(800, 6),
        positions=rng.uniform(0, 12.0, (800, 3)),
        cell=np.eye(3) * 12.0,
        pbc=True,
    )
    graph, reference = _compare_with_fairchem([atoms], ["omat"])
    _, uncapped = radius_graph(np.asarray(graph.positions, np.float64), atoms.cell[:], True, CUTOFF, None)
    counts = np.bincount(np.asarray(graph.edge_index[1]), minlength=800)
    assert uncapped.shape[0] > graph.num_edges  # the cap removed edges
    assert counts.max() > 300 and counts.min() >= 301


@pytest.mark.parametrize("task", ["omol", "omat", "oc20"])
@pytest.mark.parametrize("info", [{}, {"charge": 2}, {"spin": 4}, {"charge": -1, "spin": 2}])
def test_charge_spin_match_fairchem_validation(task, info):
    pytest.importorskip("fairchem.core")
    from fairchem.core.units.mlip_unit.api.inference import validate_uma_atoms_data

    atoms = molecule("H2O")
    atoms.info.update(info)
    reference = atoms.copy()
    validate_uma_atoms_data(reference, task)
    graph = _graph(atoms, task_name=task)
    assert int(graph.charge[0]) == reference.info["charge"]
    assert int(graph.spin[0]) == reference.info["spin"]
