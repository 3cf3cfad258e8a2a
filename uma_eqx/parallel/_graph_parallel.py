"""Graph parallelism: one structure's energy, forces and stress over a 1-D mesh of devices.

Each device evaluates the unchanged model ([`uma_eqx.UMA`][]) on its local graph (owned atoms,
then halo atoms; see [`uma_eqx.parallel.GraphPartition`][]) inside `jax.shard_map`; the
backbone's hook ([`uma_eqx.AbstractGraphExchange`][]) refreshes the halo rows before every
block and sums per-system quantities with `psum`. Forces and stress are `jax.grad` of the
shard-mapped energy: the collectives' own transposes carry the gradients back (no
hand-written backward).
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from .._backbone import AbstractGraphExchange
from .._graph import AtomicGraph
from .._potential import UMA, merge_experts_for
from .._settings import DEFAULT_SETTINGS, ExecutionSettings
from ._data import Device
from ._partition import GraphPartition, PartitionCapacity, PartitionMethod, assign_atoms, partition_graph

ExchangeMode = Literal["all_gather", "halo"]
#: Name of the mesh axis the atoms are partitioned over.
GRAPH_AXIS = "graph"


class HaloExchange(AbstractGraphExchange):
    """Refreshes a device's halo rows from their owners, inside `shard_map`.

    Two ways, the same rows (so the same numbers):

    - `"all_gather"`: every device's owned rows are all-gathered (`jax.lax.all_gather`), then
      the halo rows are picked out (`halo_source`). Simple; moves `(devices - 1) owned` rows to
      each device per layer.
    - `"halo"`: one `jax.lax.ppermute` per round of the partition (device `d` sends the
      owned rows `send_rows[r]` to `d + shift_r`); the received buffers, concatenated, are
      the halo. Moves only the halo rows, padded per round to the largest receiver.

    **Attributes:**

    - `halo_source`: `(halo,)` row of each halo atom among the all-gathered owned rows.
    - `send_rows`: per round, the owned rows this device sends.
    - `owned`: owned rows per device (static).
    - `shifts`: each round's device shift (static).
    - `num_devices`: devices on the mesh axis (static).
    - `mode`: `"all_gather"` or `"halo"` (static).
    - `axis_name`: the mesh axis (static).
    """

    halo_source: Int[Array, " halo"]
    send_rows: tuple[Int[Array, " rows"], ...]
    owned: int = eqx.field(static=True)
    shifts: tuple[int, ...] = eqx.field(static=True)
    num_devices: int = eqx.field(static=True)
    mode: ExchangeMode = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __check_init__(self):
        if self.mode not in ("all_gather", "halo"):
            raise ValueError(f"unknown exchange {self.mode!r}: use 'all_gather' or 'halo'")

    def refresh(self, x: Float[Array, "atoms ..."]) -> Float[Array, "rows ..."]:
        """**Arguments:**

        - `x`: this device's rows, owned rows first (any rows past `owned` are ignored).

        **Returns:**

        `(owned + halo, ...)`: the owned rows followed by the halo rows, from their owners.
        """
        own = x[: self.owned]
        if self.halo_source.shape[0] == 0:
            return own
        match self.mode:
            case "all_gather":
                gathered = jax.lax.all_gather(own, self.axis_name, tiled=True)
                halo = gathered[self.halo_source]
            case "halo":
                d = self.num_devices
                halo = jnp.concatenate(
                    [
                        jax.lax.ppermute(own[rows], self.axis_name, [(i, (i + k) % d) for i in range(d)])
                        for k, rows in zip(self.shifts, self.send_rows)
                    ]
                )
            case other:
                raise ValueError(f"unknown exchange {other!r}: use 'all_gather' or 'halo'")
        return jnp.concatenate([own, halo])

    def system_sum(self, s: Float[Array, "systems ..."]) -> Float[Array, "systems ..."]:
        """**Arguments:**

        - `s`: this device's per-system partial sums.

        **Returns:**

        `psum` over the mesh axis.
        """
        return jax.lax.psum(s, self.axis_name)


class DeviceTables(eqx.Module):
    """The per-device arrays of a [`uma_eqx.parallel.GraphPartition`][], as jax arrays, stacked.

    Leading axis `devices` (sharded over the mesh); `rows = owned + halo`.
    """

    atomic_numbers: Int[Array, "devices rows"]
    owned_mask: Bool[Array, "devices owned"]
    halo_source: Int[Array, "devices halo"]
    send_rows: tuple[Int[Array, "devices _"], ...]
    edge_index: Int[Array, "devices 2 edges"]
    edge_shift: Float[Array, "devices edges 3"]
    edge_mask: Bool[Array, "devices edges"]

    @classmethod
    def of(cls, partition: GraphPartition, atomic_numbers: np.ndarray, dtype) -> "DeviceTables":
        """The tables of `partition` for atoms with `atomic_numbers`, shifts in `dtype`."""
        z = np.concatenate([atomic_numbers[partition.owned_atoms], atomic_numbers[partition.halo_atoms]], axis=1)
        z = np.where(np.concatenate([partition.owned_mask, partition.halo_mask], axis=1), z, 0)
        return cls(
            jnp.asarray(z),
            jnp.asarray(partition.owned_mask),
            jnp.asarray(partition.halo_source),
            tuple(jnp.asarray(rows) for rows in partition.send_rows),
            jnp.asarray(np.stack([partition.edge_source, partition.edge_target], axis=1)),
            jnp.asarray(partition.edge_shift, dtype),
            jnp.asarray(partition.edge_mask),
        )


def _local_energy(
    model: UMA,
    capacity: PartitionCapacity,
    num_devices: int,
    mode: ExchangeMode,
    settings: ExecutionSettings,
    positions: Float[Array, "owned 3"],
    tables: DeviceTables,
    cell: Float[Array, "1 3 3"],
    charge: Int[Array, " 1"],
    spin: Int[Array, " 1"],
    dataset_index: Int[Array, " 1"],
    roll: Float[Array, ""],
    strain: Float[Array, "1 3 3"],
) -> Float[Array, " 1"]:
    """One device's part (inside `shard_map`): its local graph through the whole model."""
    t = jax.tree.map(lambda a: a[0], tables)
    exchange = HaloExchange(
        halo_source=t.halo_source,
        send_rows=t.send_rows,
        owned=capacity.owned,
        shifts=tuple(k for k, _ in capacity.rounds),
        num_devices=num_devices,
        mode=mode,
        axis_name=GRAPH_AXIS,
    )
    local_positions = exchange.refresh(positions)
    rows = local_positions.shape[0]
    graph = AtomicGraph(
        positions=local_positions,
        atomic_numbers=t.atomic_numbers,
        system_index=jnp.zeros(rows, jnp.int32),
        edge_index=t.edge_index,
        edge_shift=t.edge_shift,
        cell=cell,
        charge=charge,
        spin=spin,
        dataset_index=dataset_index,
        atom_mask=jnp.concatenate([t.owned_mask, jnp.zeros(rows - capacity.owned, bool)]),
        edge_mask=t.edge_mask,
        system_mask=jnp.ones(1, bool),
    )
    return model(graph, roll, strain, settings=settings, exchange=exchange)


@eqx.filter_jit
def _sharded_efs(
    model: UMA,
    mesh: Mesh,
    capacity: PartitionCapacity,
    mode: ExchangeMode,
    settings: ExecutionSettings,
    stress: bool,
    positions: Float[Array, "devices_owned 3"],
    tables: DeviceTables,
    cell: Float[Array, "1 3 3"],
    charge: Int[Array, " 1"],
    spin: Int[Array, " 1"],
    dataset_index: Int[Array, " 1"],
    roll: Float[Array, ""],
) -> dict[str, Array]:
    """Energy, `dE/d(positions)` in the partition's row layout, and `dE/d(strain)`."""
    num_devices = mesh.shape[GRAPH_AXIS]
    params, static = eqx.partition(model, eqx.is_array)

    def local(params, positions, tables, cell, charge, spin, dataset_index, roll, strain):
        return _local_energy(
            eqx.combine(params, static),
            capacity,
            num_devices,
            mode,
            settings,
            positions,
            tables,
            cell,
            charge,
            spin,
            dataset_index,
            roll,
            strain,
        )

    replicated, sharded = P(), P(GRAPH_AXIS)
    energy_fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, sharded, sharded, replicated, replicated, replicated, replicated, replicated, replicated),
        out_specs=replicated,
        # the model's scans start from zeros that know nothing of the mesh axis; without the
        # varying-axis check, shard_map's transpose scales replicated cotangents itself
        check_vma=False,
    )

    def total(positions, strain):
        # the symmetric strain of `energy_forces_stress` (fairchem's convention)
        sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
        e = energy_fn(params, positions, tables, cell, charge, spin, dataset_index, roll, sym)
        return jnp.sum(e), e

    strain0 = jnp.zeros((1, 3, 3), positions.dtype)
    (grad_r, grad_s), energy = jax.grad(total, argnums=(0, 1), has_aux=True)(positions, strain0)
    out = {"energy": energy, "grad_positions": grad_r}
    if stress:
        out["stress"] = grad_s / jnp.abs(jnp.linalg.det(cell))[:, None, None]
    return out


def make_mesh(devices: Sequence[Device] | None = None) -> Mesh:
    """A 1-D mesh named [`GRAPH_AXIS`][uma_eqx.parallel.GRAPH_AXIS] over `devices` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 0:
        raise ValueError("devices is empty: pass at least one jax device (e.g. jax.devices())")
    return Mesh(np.asarray(devices, dtype=object), (GRAPH_AXIS,))


def _single_system(graph: AtomicGraph) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the real atoms and edges of a graph holding one real system (system 0)."""
    if graph.batch_shape:
        raise ValueError(f"graph parallelism takes one graph, got a stack with leading axes {graph.batch_shape}")
    system_mask = np.asarray(graph.system_mask)
    if not system_mask[0] or system_mask.sum() != 1:
        raise ValueError(
            f"graph parallelism evaluates one structure: the graph has {int(system_mask.sum())} real systems "
            "(system 0 must be the only one); split the batch or use uma_eqx.predict"
        )
    atoms = np.flatnonzero(np.asarray(graph.atom_mask) & (np.asarray(graph.system_index) == 0))
    edges = np.flatnonzero(np.asarray(graph.edge_mask))
    return atoms, edges


@dataclasses.dataclass(frozen=True)
class ShardedStructure:
    """One structure laid out over a mesh, ready for
    [`energy_forces_stress_sharded`][uma_eqx.parallel.energy_forces_stress_sharded].

    Built with [`ShardedStructure.build`][uma_eqx.parallel.ShardedStructure.build]; the
    calculator keeps its capacity between steps (one compiled program while structures fit).

    **Attributes:**

    - `partition`: the host tables ([`uma_eqx.parallel.GraphPartition`][]).
    - `atoms`: `(real atoms,)` index in the graph of each partitioned atom.
    - `tables`: the device tables, sharded over the mesh.
    - `positions`: `(devices * owned, 3)` positions in the partition's row layout, sharded.
    - `graph`: the whole-structure graph it came from.
    - `mesh`: the 1-D mesh.
    """

    partition: GraphPartition
    atoms: Int[np.ndarray, " real_atoms"]
    tables: DeviceTables
    positions: Float[Array, "devices_owned 3"]
    graph: AtomicGraph
    mesh: Mesh

    @classmethod
    def build(
        cls,
        graph: AtomicGraph,
        mesh: Mesh,
        method: PartitionMethod = "morton",
        capacity: PartitionCapacity | None = None,
        pbc: Sequence[bool] | np.ndarray | None = None,
    ) -> "ShardedStructure":
        """Partition the one structure of `graph` over `mesh`.

        **Arguments:**

        - `graph`: an [`uma_eqx.AtomicGraph`][] whose only real system is system 0 (padding allowed).
        - `mesh`: a 1-D mesh (see [`make_mesh`][uma_eqx.parallel.make_mesh]).
        - `method`: `"morton"` or `"slab"` (see [`uma_eqx.parallel.assign_atoms`][]).
        - `capacity`: fixed per-device sizes; `None`: the smallest that fit.
        - `pbc`: periodicity per axis, only to order the atoms (every ordering gives the same
          numbers); `None`: the axes along which some edge crosses the cell.

        **Returns:**

        The `ShardedStructure`.

        **Raises:**

        `ValueError` for a batch of several structures, or when the structure needs more than
        `capacity` (the message names the sizes; pass `capacity=None` or a larger one).
        """
        atoms, edges = _single_system(graph)
        num_devices = mesh.shape[GRAPH_AXIS]
        positions = np.asarray(graph.positions, np.float64)[atoms]
        cell = np.asarray(graph.cell[0], np.float64)
        shift = np.asarray(graph.edge_shift, np.float64)[edges]
        if pbc is None:  # along an axis no edge crosses, unwrapped coordinates order atoms as well
            pbc = np.any(shift != 0, axis=0) if shift.size else np.zeros(3, bool)
        owner = assign_atoms(positions, cell, np.asarray(pbc, bool), num_devices, method)
        # renumber the real atoms 0..n-1 for the partition
        renumber = np.full(graph.num_atoms, -1, np.int64)
        renumber[atoms] = np.arange(atoms.shape[0])
        edge_index = renumber[np.asarray(graph.edge_index)[:, edges]]
        if (edge_index < 0).any():
            raise ValueError("an edge of system 0 touches a padded atom or another system: rebuild the graph")
        partition = partition_graph(owner, edge_index, shift, num_devices, capacity)
        dtype = graph.positions.dtype
        tables = DeviceTables.of(partition, np.asarray(graph.atomic_numbers)[atoms], dtype)
        sharding = NamedSharding(mesh, P(GRAPH_AXIS))
        tables = jax.device_put(tables, sharding)
        rows = positions[partition.owned_atoms] * partition.owned_mask[..., None]
        flat = jax.device_put(jnp.asarray(rows.reshape(-1, 3), dtype), sharding)
        return cls(partition, atoms, tables, flat, graph, mesh)


@eqx.filter_jit
def _checked_positions(model: UMA, graph: AtomicGraph) -> Float[Array, "atoms 3"]:
    return graph.checked(model.config.max_num_elements, len(model.config.datasets)).positions


def _check_graph(model: UMA, graph: AtomicGraph) -> None:
    """[`uma_eqx.AtomicGraph.checked`][] on the whole graph (its error cannot be raised inside
    `shard_map`, so the devices' parts are not checked again)."""
    jax.block_until_ready(_checked_positions(model, graph))


def energy_forces_stress_sharded(
    model: UMA,
    structure: "AtomicGraph | ShardedStructure | object",
    devices: Sequence[Device] | None = None,
    *,
    task_name: str | None = None,
    exchange: ExchangeMode = "halo",
    method: PartitionMethod = "morton",
    stress: bool = True,
    roll: float = 0.0,
    settings: ExecutionSettings = DEFAULT_SETTINGS,
) -> dict[str, Array]:
    """Energy, forces and stress of one structure, its atoms partitioned over `devices`.

    The same numbers as [`uma_eqx.energy_forces_stress`][] on one device (up to summation
    order): energy by `psum`, forces `-dE/dr` and stress `(1/V) dE/d(strain)` (symmetric
    strain on the edge vectors, `V = |det cell|`) by `jax.grad` through the collectives. A
    model with MoLE experts is merged for the structure first (as the calculator does).

    **Arguments:**

    - `model`: the model.
    - `structure`: an `ase.Atoms`, an [`uma_eqx.AtomicGraph`][] of one system (padding
      allowed), or a prepared [`ShardedStructure`][uma_eqx.parallel.ShardedStructure].
    - `devices`: the devices (default: all); ignored for a `ShardedStructure` (it has its mesh).
    - `task_name`: the task, for an `ase.Atoms` (as [`uma_eqx.AtomicGraph.for_model`][]).
    - `exchange`: `"halo"` (ppermute rounds of the halo rows) or `"all_gather"`.
    - `method`: partition method, `"morton"` or `"slab"`.
    - `stress`: also compute the stress.
    - `roll`: edge-frame roll angle.
    - `settings`: how each device executes (see [`uma_eqx.ExecutionSettings`][]).

    **Returns:**

    A dict with `energy (1,)`, `forces (atoms, 3)` (the graph's atom order; zero on padded
    atoms) and, if `stress`, `stress (1, 3, 3)`.
    """
    import ase

    if exchange not in ("all_gather", "halo"):
        raise ValueError(f"unknown exchange {exchange!r}: use 'all_gather' or 'halo'")
    pbc = None
    if isinstance(structure, ase.Atoms):
        pbc = structure.pbc
        structure = AtomicGraph.for_model(model, structure, task_name)
    if isinstance(structure, AtomicGraph):
        structure = ShardedStructure.build(structure, make_mesh(devices), method, pbc=pbc)
    if not isinstance(structure, ShardedStructure):
        raise ValueError(
            f"structure is a {type(structure).__name__}: pass an ase.Atoms, an AtomicGraph or a ShardedStructure"
        )
    graph = structure.graph
    _check_graph(model, graph)
    if model.backbone.router is not None:
        model = merge_experts_for(model, graph)
    if not structure.partition.capacity.rounds:
        exchange = "all_gather"  # no halo: both modes are the same program (compiled once)
    out = _sharded_efs(
        model,
        structure.mesh,
        structure.partition.capacity,
        exchange,
        settings,
        stress,
        structure.positions,
        structure.tables,
        graph.cell[:1],
        graph.charge[:1],
        graph.spin[:1],
        graph.dataset_index[:1],
        jnp.asarray(roll, graph.positions.dtype),
    )
    partition = structure.partition
    rows = partition.owner * partition.capacity.owned + partition.local_row
    forces = jnp.zeros_like(graph.positions).at[structure.atoms].set(-out["grad_positions"][rows])
    result = {"energy": out["energy"], "forces": forces}
    if stress:
        result["stress"] = out["stress"]
    return result
