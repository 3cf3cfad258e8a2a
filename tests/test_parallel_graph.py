"""Graph parallelism (`uma_eqx.parallel`): one structure over 1, 2, 4 and 8 devices equals one device.

The multi-device cases run in one child process with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX starts). Every
structure of a device count shares one padded capacity, so each (devices, exchange) pair
compiles one program. The partition and exchange-volume tests run here, on the host.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ase import Atoms

from uma_eqx.parallel import (
    PartitionCapacity,
    assign_atoms,
    exchange_volume,
    feature_row_bytes,
    partition_graph,
)

#: float64 agreement with one device, relative to the largest reference component (issue 18).
TOLERANCE = 1e-10
DEVICE_COUNTS = (1, 2, 4, 8)
EXCHANGES = ("all_gather", "halo")

_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    from ase import Atoms
    import uma_eqx
    from uma_eqx.parallel import ShardedStructure, energy_forces_stress_sharded, make_mesh

    assert len(jax.devices()) == 8, jax.devices()
    config = uma_eqx.UMAConfig(
        sphere_channels=4, hidden_channels=4, edge_channels=4, lmax=1, mmax=1, num_layers=2,
        num_distance_basis=4, cutoff=3.0, datasets=("omat", "omol"), dataset_embedding_names=("omat", "omol"),
        num_experts=2, use_composition_embedding=True,
        charge_balanced_channels=(0, 2), spin_balanced_channels=(2, 3),
    )
    skeleton = eqx.filter_eval_shape(uma_eqx.UMA, config, jnp.float64, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    model = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(scale=0.5, size=leaf.shape), leaf.dtype)
        if isinstance(leaf, jax.ShapeDtypeStruct) else leaf,
        skeleton,
    )
    settings = uma_eqx.ExecutionSettings(edge_chunk_size=64)

    from ase.geometry import get_distances

    def spread(n, cell, pbc, seed):  # random atoms at least 0.9 A apart (periodic images included)
        r = np.random.default_rng(seed)
        points = np.zeros((0, 3))
        while len(points) < n:
            p = r.random((1, 3)) @ cell
            if len(points) == 0 or get_distances(p, points, cell=cell, pbc=pbc)[1].min() > 0.9:
                points = np.concatenate([points, p])
        return points

    rng = np.random.default_rng(1)
    triclinic_cell = np.array([[5.0, 0.0, 0.0], [3.1, 4.4, 0.0], [1.7, 2.2, 4.6]])  # skewed
    triclinic = Atoms(numbers=rng.integers(1, 9, 14), positions=spread(14, triclinic_cell, True, 2),
                      cell=triclinic_cell, pbc=True)
    slab_cell = np.array([[5.5, 0, 0], [0.8, 5.0, 0], [0, 0, 12.0]])
    slab_xyz = spread(10, slab_cell * [[1], [1], [0.25]], [True, True, False], 3) + [0.0, 0.0, 4.0]
    slab = Atoms(numbers=rng.integers(1, 9, 10), positions=slab_xyz, cell=slab_cell, pbc=[True, True, False])
    molecule = Atoms(numbers=rng.integers(1, 9, 9), positions=spread(9, np.eye(3) * 3.5, False, 4))
    molecule.info.update(charge=1, spin=2)
    tiny_cell = Atoms("CuO", positions=[[0.1, 0.2, 0.3], [1.2, 1.1, 1.4]], cell=np.eye(3) * 2.4, pbc=True)
    three_atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    # (name, atoms, task, partition method)
    cases = [
        ("triclinic", triclinic, "omat", "morton"),
        ("triclinic_thin_slabs", triclinic, "omat", "slab"),
        ("slab", slab, "omat", "morton"),
        ("slab_thin", slab, "omat", "slab"),
        ("molecule", molecule, "omol", "morton"),
        ("cell_smaller_than_cutoff", tiny_cell, "omat", "morton"),
        ("more_devices_than_atoms", three_atoms, "omol", "slab"),
    ]
    graphs = [uma_eqx.AtomicGraph.for_model(model, a, t, min_distance=None) for _, a, t, _ in cases]
    sizes = (max(g.num_atoms for g in graphs) + 1, max(g.num_edges for g in graphs) + 32, 2)
    graphs = [uma_eqx.pad_graph(g, *sizes) for g in graphs]

    efs = eqx.filter_jit(
        lambda m, g: uma_eqx.energy_forces_stress(uma_eqx.merge_experts_for(m, g), g, settings=settings)
    )
    references = [efs(model, g) for g in graphs]

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    results, extra = [], {}
    for devices in (1, 2, 4, 8):
        mesh = make_mesh(jax.devices()[:devices])
        built = [ShardedStructure.build(g, mesh, method, pbc=a.pbc) for g, (_, a, _, method) in zip(graphs, cases)]
        capacity = built[0].partition.capacity
        for b in built[1:]:
            capacity = capacity.union(b.partition.capacity)
        built = [
            ShardedStructure.build(g, mesh, method, capacity, pbc=a.pbc) for g, (_, a, _, method) in zip(graphs, cases)
        ]
        for exchange in ("all_gather", "halo"):
            for (name, atoms, _, method), b, ref in zip(cases, built, references):
                out = energy_forces_stress_sharded(model, b, exchange=exchange, settings=settings)
                volume = b.partition.exchange_volume(8)
                results.append(dict(
                    name=name, devices=devices, exchange=exchange,
                    energy=rel(out["energy"], ref["energy"][:1]), forces=rel(out["forces"], ref["forces"]),
                    stress=rel(out["stress"], ref["stress"][:1]),
                    empty_devices=int(np.sum(volume.owned_atoms == 0)),
                    max_shift=max([k for k, _ in b.partition.capacity.rounds] or [0]),
                ))
    # thickness of the thin slabs: the triclinic cell's widest perpendicular width over 8
    cell = triclinic_cell
    widths = abs(np.linalg.det(cell)) / np.linalg.norm(
        [np.cross(cell[1], cell[2]), np.cross(cell[2], cell[0]), np.cross(cell[0], cell[1])], axis=1)
    extra["thin_slab_thickness"] = float(widths.max() / 8)
    # the ASE calculator over 4 devices, two steps (the second reuses the grown capacity)
    from ase.stress import full_3x3_to_voigt_6_stress
    from uma_eqx.calculator import UMACalculator
    calc = UMACalculator(model, task_name="omat", settings=settings, devices=jax.devices()[:4])
    moved = slab.copy()
    moved.positions += np.random.default_rng(5).normal(scale=0.03, size=(10, 3))
    moved_graph = uma_eqx.pad_graph(uma_eqx.AtomicGraph.for_model(model, moved, "omat", min_distance=None), *sizes)
    calculator = []
    for atoms, ref in ((slab, references[2]), (moved, efs(model, moved_graph))):
        atoms = atoms.copy()
        atoms.calc = calc
        calculator.append(dict(
            energy=rel(atoms.get_potential_energy(), ref["energy"][0]),
            forces=rel(atoms.get_forces(), ref["forces"][:10]),
            stress=rel(atoms.get_stress(), full_3x3_to_voigt_6_stress(np.asarray(ref["stress"][0]))),
            halo_bytes=calc.exchange_volume.halo_bytes, all_gather_bytes=calc.exchange_volume.all_gather_bytes,
        ))
    extra["calculator"] = calculator
    # bad input: clear errors
    errors = {}
    def error(key, f):
        try:
            f()
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    from uma_eqx.parallel import PartitionCapacity
    mesh2 = make_mesh(jax.devices()[:2])
    error("overflow", lambda: ShardedStructure.build(graphs[0], mesh2, "morton", PartitionCapacity(2, 4, ())))
    two = uma_eqx.AtomicGraph.for_model(model, [molecule, three_atoms], "omol")
    error("two_systems", lambda: ShardedStructure.build(two, mesh2))
    error("exchange", lambda: energy_forces_stress_sharded(model, graphs[0], jax.devices()[:2], exchange="ring"))
    error("no_devices", lambda: make_mesh([]))
    print("RESULT" + json.dumps(dict(results=results, extra=extra, errors=errors)))
    """
)


@pytest.fixture(scope="module")
def child():
    # 8 simulated devices; XLA's backend optimisations off: they cost most of the compile time
    # of these tiny programs, and the equalities tested do not depend on them
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT") :])


def test_sharded_equals_one_device(child):
    results = child["results"]
    names = {r["name"] for r in results}
    assert len(results) == len(names) * len(DEVICE_COUNTS) * len(EXCHANGES)
    for r in results:
        for key in ("energy", "forces", "stress"):
            assert r[key] <= TOLERANCE, r


def test_covers_thin_and_empty_partitions(child):
    """The matrix holds partitions thinner than the cutoff (halo rows from devices several
    shifts away) and devices that own no atom."""
    assert child["extra"]["thin_slab_thickness"] < 3.0  # the test model's cutoff
    thin = [r for r in child["results"] if r["name"] == "triclinic_thin_slabs" and r["devices"] == 8]
    assert all(r["max_shift"] >= 2 for r in thin)
    empty = [r for r in child["results"] if r["name"] == "more_devices_than_atoms" and r["devices"] == 8]
    assert all(r["empty_devices"] == 5 for r in empty)


def test_calculator_over_devices(child):
    """`UMACalculator(model, task_name=..., devices=...)` equals one device, over two steps."""
    for step in child["extra"]["calculator"]:
        for key in ("energy", "forces", "stress"):
            assert step[key] <= TOLERANCE, step
        assert 0 < step["halo_bytes"] <= step["all_gather_bytes"]


def test_bad_input_errors(child):
    errors = child["errors"]
    assert "capacity" in errors["overflow"] and "needs" in errors["overflow"]
    assert "2 real systems" in errors["two_systems"]
    assert "'ring'" in errors["exchange"]
    assert "empty" in errors["no_devices"]


# ------------------------------------------------------------------------------ host side


def _chain(n: int, spacing: float) -> Atoms:
    return Atoms("H" * n, positions=[[spacing * i, 0.0, 0.0] for i in range(n)])


def test_exchange_volume_by_hand():
    """Six atoms on a line 1 Å apart, cutoff 1.5 Å (nearest neighbours only), 3 slabs of 2.

    Devices own atoms {0,1}, {2,3}, {4,5}; halos {2}, {1,4}, {3}. All-gather: each device
    receives the 2 other devices' 2 rows. Halo rounds: shift 1 (device d receives from d-1: 0,
    1, 1 rows; padded to 1) and shift 2 (d receives from d-2, i.e. d+1: 1, 1, 0; padded to 1).
    """
    atoms = _chain(6, 1.0)
    row = 3 * 4 * 8
    volume = exchange_volume(atoms.positions, np.eye(3), [False] * 3, 1.5, 3, row, method="slab")
    np.testing.assert_array_equal(volume.owned_atoms, [2, 2, 2])
    np.testing.assert_array_equal(volume.halo_atoms, [1, 2, 1])
    assert volume.rounds == ((1, 1), (2, 1))
    assert volume.all_gather_bytes_per_device == 2 * 2 * row
    assert volume.all_gather_bytes == 3 * 2 * 2 * row
    assert volume.halo_bytes_per_device == 2 * row
    assert volume.halo_bytes == 3 * 2 * row
    assert volume.needed_bytes == 4 * row


def test_partition_tables_by_hand():
    atoms = _chain(6, 1.0)
    owner = assign_atoms(atoms.positions, np.eye(3), [False] * 3, 3, "slab")
    np.testing.assert_array_equal(owner, [0, 0, 1, 1, 2, 2])
    # nearest-neighbour edges, sorted by target
    edges = np.array([[1, 0, 2, 1, 3, 2, 4, 3, 5, 4], [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]])
    p = partition_graph(owner, edges, np.zeros((10, 3)), 3)
    np.testing.assert_array_equal(p.owned_atoms, [[0, 1], [2, 3], [4, 5]])
    # halo rows: round shift 1 first (from d-1), then shift 2 (from d+1)
    np.testing.assert_array_equal(p.halo_atoms * p.halo_mask, [[0, 2], [1, 4], [3, 0]])
    np.testing.assert_array_equal(p.halo_mask, [[False, True], [True, True], [True, False]])
    # device 1's edges: 1->2, 3->2, 2->3, 4->3 as local rows (owned 0, 1; halo 2 = atom 1, 3 = atom 4)
    np.testing.assert_array_equal(p.edge_source[1], [2, 1, 0, 3])
    np.testing.assert_array_equal(p.edge_target[1], [0, 0, 1, 1])
    # all-gather rows of device 1's halo: atom 1 (device 0 row 1), atom 4 (device 2 row 0)
    np.testing.assert_array_equal(p.halo_source[1], [1, 4])
    assert p.capacity == PartitionCapacity(2, 4, ((1, 1), (2, 1)))


def test_capacity_overflow_is_an_error():
    atoms = _chain(6, 1.0)
    owner = assign_atoms(atoms.positions, np.eye(3), [False] * 3, 3, "slab")
    edges = np.array([[1, 0, 2, 1, 3, 2, 4, 3, 5, 4], [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]])
    with pytest.raises(ValueError, match="needs"):
        partition_graph(owner, edges, np.zeros((10, 3)), 3, PartitionCapacity(2, 4, ((1, 1),)))
    big = PartitionCapacity(4, 8, ((1, 2), (2, 2)))
    p = partition_graph(owner, edges, np.zeros((10, 3)), 3, big)
    assert p.capacity == big and p.edge_mask.sum() == 10


@pytest.mark.parametrize("method", ["morton", "slab"])
@pytest.mark.parametrize("devices", [1, 3, 8])
def test_exchange_volume_matches_graph_partition(method, devices):
    """The geometric volume (vesin, no model) equals the one of the model's graph partition."""
    import uma_eqx

    rng = np.random.default_rng(devices)
    cell = np.array([[7.0, 0.0, 0.0], [2.5, 6.5, 0.0], [1.0, 2.0, 7.5]])
    atoms = Atoms("Cu40", scaled_positions=rng.random((40, 3)), cell=cell, pbc=[True, True, False])
    graph = uma_eqx.AtomicGraph.from_atoms(
        atoms,
        cutoff=3.5,
        datasets=("omat",),
        task_name="omat",
        dtype=np.float64,
        max_neighbors=None,
        min_distance=None,
    )
    owner = assign_atoms(np.asarray(graph.positions), cell, atoms.pbc, devices, method)
    counts = np.bincount(owner, minlength=devices)
    assert counts.sum() == 40 and counts.max() - counts.min() <= 1  # balanced by atom count
    p = partition_graph(owner, np.asarray(graph.edge_index), np.asarray(graph.edge_shift), devices)
    config = uma_eqx.UMAConfig(
        sphere_channels=8,
        hidden_channels=8,
        edge_channels=4,
        lmax=2,
        mmax=2,
        num_layers=1,
        num_distance_basis=4,
        cutoff=3.5,
        datasets=("omat",),
    )
    row = feature_row_bytes(config, np.float32)
    assert row == 9 * 8 * 4
    by_graph = p.exchange_volume(row)
    by_geometry = exchange_volume(np.asarray(graph.positions), cell, atoms.pbc, 3.5, devices, row, method)
    np.testing.assert_array_equal(by_geometry.halo_atoms, by_graph.halo_atoms)
    assert by_geometry.as_dict() == by_graph.as_dict()
    # every halo atom is a remote source of one of the device's edges, and none is missing
    for d in range(devices):
        sources = np.asarray(graph.edge_index[0])[owner[np.asarray(graph.edge_index[1])] == d]
        remote = np.unique(sources[owner[sources] != d])
        np.testing.assert_array_equal(np.sort(p.halo_atoms[d][p.halo_mask[d]]), remote)
