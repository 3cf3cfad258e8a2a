"""Graph parallelism inside molecular dynamics: the in-jit neighbour list, partitioned over devices.

The device side of `uma_eqx.jax_md.energy_and_neighbor_fns(..., devices=...)`. At every rebuild
of the in-jit [`uma_eqx.neighbors.NeighborList`][] (inside `jit` / `lax.scan`), atoms are
re-assigned to the devices of a 1-D mesh (a spatial order balanced by count, as
[`uma_eqx.parallel.assign_atoms`][] but in `jnp`), so atoms that crossed a partition boundary
migrate; each device gets its owned atoms, the candidate edges whose target it owns, and its
halo (the remote sources of those edges), in fixed capacities chosen on the host
([`PartitionCapacity`][uma_eqx.parallel.PartitionCapacity]). Needing more than a capacity sets
the list's overflow flag, so `uma_eqx.jax_md.run` reallocates as for the single-device list.
The model runs through the same `shard_map` body as
[`uma_eqx.parallel.energy_forces_stress_sharded`][] (`_local_energy`, with
[`uma_eqx.parallel.HaloExchange`][]), and forces and stress are `jax.grad` through it.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from .._potential import UMA
from .._settings import ExecutionSettings
from ..neighbors import NeighborList
from ._graph_parallel import GRAPH_AXIS, DeviceTables, ExchangeMode, _local_energy
from ._partition import PartitionCapacity, PartitionMethod

#: Bits per axis of the in-jit Morton key: three axes interleave into 30 bits of a `uint32`, so
#: the key needs no 64-bit integers (our choice: 1024 steps per axis order atoms that are more
#: than 1/1000 of the box apart; ties keep atom order, which only moves a boundary by one atom).
_MORTON_BITS_JNP = 10
#: Rows (and edges) added on top of `capacity_multiplier x peak` to every capacity of a list
#: reallocated after an overflow, as `uma_eqx.jax_md.run` adds 16 candidate slots: with a
#: multiplier of 1 the list would otherwise regrow to the exact peak and overflow again at the
#: next new neighbour (each reallocation is a recompilation). Our choice.
REALLOCATION_HEADROOM = 4


def _spread_bits_jnp(v: Int[Array, " atoms"]) -> Int[Array, " atoms"]:
    """Insert two zero bits between the low 10 bits of each `uint32` (one axis of a 3-D Morton key)."""
    v = v & jnp.uint32(0x3FF)
    v = (v | (v << 16)) & jnp.uint32(0x030000FF)
    v = (v | (v << 8)) & jnp.uint32(0x0300F00F)
    v = (v | (v << 4)) & jnp.uint32(0x030C30C3)
    v = (v | (v << 2)) & jnp.uint32(0x09249249)
    return v


def assign_atoms_jit(
    positions: Float[Array, "atoms 3"],
    cell: Float[Array, "3 3"],
    pbc: tuple[bool, bool, bool],
    num_devices: int,
    method: PartitionMethod = "morton",
) -> Int[Array, " atoms"]:
    """The device that owns each atom, in `jnp` (jit-able): a spatial order cut into balanced runs.

    The same partition rule as [`uma_eqx.parallel.assign_atoms`][] (coordinates along the three
    lattice normals, wrapped along periodic axes; `owner = floor(rank * devices / atoms)`), with
    a coarser Morton grid (`2**10` steps per axis, keys in `uint32`). Every device owns
    `floor(atoms / devices)` or `ceil(atoms / devices)` atoms.

    **Arguments:**

    - `positions`: `(atoms, 3)` Cartesian positions in Å.
    - `cell`: lattice vectors as rows (any non-degenerate matrix without periodic axes).
    - `pbc`: periodicity per axis (static).
    - `num_devices`: number of parts, `>= 1` (static).
    - `method`: `"slab"` (rank along the lattice normal of largest extent) or `"morton"`.

    **Returns:**

    `(atoms,)` owner in `0 .. num_devices - 1`.
    """
    num_atoms = positions.shape[0]
    periodic = jnp.asarray(pbc)
    frame = cell if any(pbc) else jnp.eye(3, dtype=positions.dtype)
    frac = jnp.linalg.solve(frame.T, positions.T).T
    cross = jnp.stack([jnp.cross(frame[1], frame[2]), jnp.cross(frame[2], frame[0]), jnp.cross(frame[0], frame[1])])
    widths = jnp.abs(jnp.linalg.det(frame)) / jnp.linalg.norm(cross, axis=-1)
    frac = jnp.where(periodic, frac % 1.0, frac - jnp.min(frac, axis=0))
    coords = frac * widths
    extent = jnp.where(periodic, widths, jnp.max(coords, axis=0))
    match method:
        case "slab":
            key = coords[:, jnp.argmax(extent)]
        case "morton":
            top = 2**_MORTON_BITS_JNP - 1
            step = jnp.maximum(jnp.max(extent), 1e-12) / top
            q = jnp.clip(jnp.floor(coords / step), 0, top).astype(jnp.uint32)
            key = _spread_bits_jnp(q[:, 0]) | (_spread_bits_jnp(q[:, 1]) << 1) | (_spread_bits_jnp(q[:, 2]) << 2)
        case other:
            raise ValueError(f"unknown partition method {other!r}: use 'morton' or 'slab'")
    order = jnp.argsort(key, stable=True)
    ranks = jnp.arange(num_atoms, dtype=jnp.int32)
    return jnp.zeros(num_atoms, jnp.int32).at[order].set((ranks * num_devices) // num_atoms)


class ShardedNeighborList(eqx.Module):
    """An in-jit neighbour list and its partition over the devices of a 1-D mesh.

    The partition is a function of the list (the owners follow from its reference positions
    at the last rebuild), recomputed whenever the list is rebuilt. Per-device tables are
    stacked `(devices, ...)`, laid out as [`uma_eqx.parallel.GraphPartition`][]: device `d`
    has `owned + halo` rows, its owned atoms (in increasing atom index) then its halo (grouped
    by ppermute round, in `capacity.rounds` order).

    **Fields:**

    - `neighbors`: the whole structure's candidate list ([`uma_eqx.neighbors.NeighborList`][]).
    - `owner`: `(atoms,)` device of every atom at the last rebuild.
    - `owned_atoms`, `owned_mask`: `(devices, owned)` atom of each owned row.
    - `halo_source`: `(devices, halo)` row of each halo atom among the all-gathered owned rows.
    - `send_rows`: per round, `(devices, rows)` owned rows that device `d` sends.
    - `atomic_numbers`: `(devices, owned + halo)` atomic numbers of the local rows (0: padding).
    - `edge_candidate`: `(devices, edges)` index of each local edge in `neighbors`.
    - `edge_index`: `(devices, 2, edges)` local source and target rows.
    - `edge_valid`: `(devices, edges)` which local edges are candidates (else padding).
    - `partition_overflow`: some rebuild needed more than `capacity` (sticky).
    - `peak_edges`, `peak_halo`: the most edges of one device, and `(devices,)` the most halo
      rows of one device per round shift, over every rebuild since allocation (to reallocate).
    - `capacity`: the fixed sizes (static).
    """

    neighbors: NeighborList
    owner: Int[Array, " atoms"]
    owned_atoms: Int[Array, "devices owned"]
    owned_mask: Bool[Array, "devices owned"]
    halo_source: Int[Array, "devices halo"]
    send_rows: tuple[Int[Array, "devices _"], ...]
    atomic_numbers: Int[Array, "devices rows"]
    edge_candidate: Int[Array, "devices edges"]
    edge_index: Int[Array, "devices 2 edges"]
    edge_valid: Bool[Array, "devices edges"]
    partition_overflow: Bool[Array, ""]
    peak_edges: Int[Array, ""]
    peak_halo: Int[Array, " devices"]
    capacity: PartitionCapacity = eqx.field(static=True)

    @property
    def did_buffer_overflow(self) -> Bool[Array, ""]:
        """The candidate buffer or a partition capacity overflowed at some rebuild: reallocate."""
        return self.neighbors.did_buffer_overflow | self.partition_overflow

    @property
    def num_devices(self) -> int:
        """Devices of the partition (static)."""
        return self.owned_atoms.shape[0]


@dataclasses.dataclass(frozen=True)
class GraphPartitioner:
    """Partitions an in-jit [`uma_eqx.neighbors.NeighborList`][] over `num_devices` devices.

    **Arguments:**

    - `num_devices`: devices of the 1-D mesh.
    - `pbc`: periodicity per axis (to order atoms along wrapped coordinates).
    - `method`: `"morton"` or `"slab"` (see [`assign_atoms_jit`][uma_eqx.parallel.assign_atoms_jit]).
    - `capacity_multiplier`: head-room of the edge and halo capacities over the counts at
      allocation (the owned capacity is exact: `ceil(atoms / devices)`).
    """

    num_devices: int
    pbc: tuple[bool, bool, bool]
    method: PartitionMethod = "morton"
    capacity_multiplier: float = 1.25

    def __post_init__(self):
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise ValueError(f"num_devices={self.num_devices!r} is invalid: use an int >= 1")
        if self.method not in ("morton", "slab"):
            raise ValueError(f"unknown partition method {self.method!r}: use 'morton' or 'slab'")
        if not self.capacity_multiplier >= 1.0:
            raise ValueError(f"capacity_multiplier must be >= 1, got {self.capacity_multiplier!r}.")

    def needs(self, neighbors: NeighborList) -> tuple[Array, ...]:
        """The owners of the atoms and what each device needs, whatever the capacities (jit-able).

        **Arguments:**

        - `neighbors`: the candidate list (the owners follow from its reference positions).

        **Returns:**

        `(owner, edge_device, edge_counts, needed, shift, halo_counts)`: `(atoms,)` owners;
        `(candidates,)` device of each candidate edge (`devices` for unused slots); `(devices,)`
        edges per device; `(devices, atoms)` whether the device needs the atom in its halo and
        the round shift it would come in (`(device - owner) % devices`); `(devices, devices)`
        halo rows per device and shift.
        """
        d = self.num_devices
        num_atoms = neighbors.reference_positions.shape[0]
        devices = jnp.arange(d, dtype=jnp.int32)[:, None]
        owner = assign_atoms_jit(neighbors.reference_positions, neighbors.reference_cell, self.pbc, d, self.method)
        source, target = neighbors.edge_index[0], neighbors.edge_index[1]
        edge_device = jnp.where(neighbors.edge_mask, owner[target], d)
        edge_counts = jnp.bincount(edge_device, length=d + 1)[:d]
        # halo: remote sources of every candidate edge (also those past the edge capacity)
        remote = neighbors.edge_mask & (owner[source] != owner[target])
        receiver = jnp.where(remote, owner[target], d)
        needed = jnp.zeros((d, num_atoms), bool).at[receiver, source].set(True, mode="drop")
        shift = (devices - owner[None, :]) % d
        halo_counts = jax.vmap(lambda n, s: jax.ops.segment_sum(n.astype(jnp.int32), s, num_segments=d))(needed, shift)
        return owner, edge_device, edge_counts, needed, shift, halo_counts

    def partition(
        self, neighbors: NeighborList, atomic_numbers: Int[Array, " atoms"], capacity: PartitionCapacity,
        previous: ShardedNeighborList | None = None,
    ) -> ShardedNeighborList:  # fmt: skip
        """Assign atoms and lay out every device's graph (jit-able).

        **Arguments:**

        - `neighbors`: the candidate list (the owners follow from its reference positions).
        - `atomic_numbers`: `(atoms,)` atomic numbers.
        - `capacity`: the fixed sizes; needing more sets `partition_overflow`.
        - `previous`: the partition this one replaces (its overflow flag and peaks carry over).

        **Returns:**

        The [`ShardedNeighborList`][uma_eqx.parallel.ShardedNeighborList].
        """
        d = self.num_devices
        num_atoms = neighbors.reference_positions.shape[0]
        oc, ec, hc = capacity.owned, capacity.edges, capacity.halo
        devices = jnp.arange(d, dtype=jnp.int32)[:, None]
        atoms = jnp.arange(num_atoms, dtype=jnp.int32)
        owner, edge_device, edge_counts, needed, shift, halo_counts = self.needs(neighbors)

        # owned rows: each device's atoms in increasing index (edges sorted by target stay sorted)
        by_owner = jnp.argsort(owner, stable=True).astype(jnp.int32)
        counts = jnp.bincount(owner, length=d).astype(jnp.int32)
        starts = jnp.cumsum(counts) - counts
        local_row = jnp.zeros(num_atoms, jnp.int32).at[by_owner].set(atoms - starts[owner[by_owner]])
        owned_mask = jnp.arange(oc)[None, :] < counts[:, None]
        owned_atoms = jnp.where(owned_mask, by_owner[jnp.clip(starts[:, None] + jnp.arange(oc), 0, num_atoms - 1)], 0)

        # edges: the candidates whose target the device owns, in the list's order
        source, target = neighbors.edge_index[0], neighbors.edge_index[1]
        num_candidates = source.shape[0]
        by_device = jnp.argsort(edge_device, stable=True).astype(jnp.int32)
        edge_starts = jnp.cumsum(edge_counts) - edge_counts
        edge_valid = jnp.arange(ec)[None, :] < edge_counts[:, None]
        slots = jnp.clip(edge_starts[:, None] + jnp.arange(ec), 0, num_candidates - 1)
        candidate = jnp.where(edge_valid, by_device[slots], 0)
        src, tgt = source[candidate], target[candidate]

        # halo rows: by round (in `capacity.rounds` order), then atom index
        allowed = np.zeros(d, np.int64)
        for k, rows in capacity.rounds:
            allowed[k] = rows
        halo_slot = jnp.full((d, num_atoms), hc, jnp.int32)
        offset = 0
        for k, rows in capacity.rounds:
            in_round = needed & (shift == k)
            rank = jnp.cumsum(in_round, axis=1, dtype=jnp.int32) - 1
            halo_slot = jnp.where(in_round & (rank < rows), offset + rank, halo_slot)
            offset += rows
        halo_atoms = jnp.zeros((d, hc + 1), jnp.int32).at[devices, halo_slot].set(atoms[None, :])[:, :hc]
        halo_mask = jnp.zeros((d, hc + 1), bool).at[devices, halo_slot].set(True)[:, :hc]
        halo_source = jnp.where(halo_mask, owner[halo_atoms] * oc + local_row[halo_atoms], 0)
        send_rows, offset = [], 0
        for k, rows in capacity.rounds:
            # device s sends, in round k, the rows that device (s + k) % d receives
            send_rows.append(local_row[jnp.roll(halo_atoms[:, offset : offset + rows], -k, axis=0)])
            offset += rows

        local_source = jnp.where(owner[src] == devices, local_row[src], oc + halo_slot[devices, src])
        local_source = jnp.where(edge_valid & (local_source < oc + hc), local_source, 0)
        local_target = jnp.where(edge_valid, local_row[tgt], 0)
        z_owned = jnp.where(owned_mask, atomic_numbers[owned_atoms], 0)
        z = jnp.concatenate([z_owned, jnp.where(halo_mask, atomic_numbers[halo_atoms], 0)], axis=1)
        overflow = (
            jnp.any(counts > oc) | jnp.any(edge_counts > ec) | jnp.any(halo_counts > jnp.asarray(allowed)[None, :])
        )
        peak_edges, peak_halo = jnp.max(edge_counts), jnp.max(halo_counts, axis=0)
        if previous is not None:
            overflow = overflow | previous.partition_overflow
            peak_edges = jnp.maximum(peak_edges, previous.peak_edges)
            peak_halo = jnp.maximum(peak_halo, previous.peak_halo)
        return ShardedNeighborList(
            neighbors=neighbors,
            owner=owner,
            owned_atoms=owned_atoms,
            owned_mask=owned_mask,
            halo_source=halo_source.astype(jnp.int32),
            send_rows=tuple(send_rows),
            atomic_numbers=z.astype(jnp.int32),
            edge_candidate=candidate,
            edge_index=jnp.stack([local_source, local_target], axis=1).astype(jnp.int32),
            edge_valid=edge_valid,
            partition_overflow=overflow,
            peak_edges=peak_edges.astype(jnp.int32),
            peak_halo=peak_halo.astype(jnp.int32),
            capacity=capacity,
        )

    def capacity_for(
        self, num_atoms: int, peak_edges: int, peak_halo: Int[np.ndarray, " devices"],
        at_least: PartitionCapacity | None = None, headroom: int = 0,
    ) -> PartitionCapacity:  # fmt: skip
        """Capacities with `capacity_multiplier` head-room over the given peaks (host).

        **Arguments:**

        - `num_atoms`: atoms of the structure (owned rows: `ceil(atoms / devices)`).
        - `peak_edges`: the most edges one device needed.
        - `peak_halo`: `(devices,)` the most halo rows one device needed per round shift.
        - `at_least`: a capacity to grow from (the result fits it too).
        - `headroom`: edges and rows added to every edge and halo capacity.

        **Returns:**

        The [`PartitionCapacity`][uma_eqx.parallel.PartitionCapacity].
        """
        grow = self.capacity_multiplier
        rounds = tuple(
            (k, math.ceil(int(rows) * grow) + headroom)
            for k, rows in enumerate(np.asarray(peak_halo))
            if k >= 1 and rows > 0
        )
        owned = max(1, math.ceil(num_atoms / self.num_devices))
        capacity = PartitionCapacity(owned, max(1, math.ceil(int(peak_edges) * grow) + headroom), rounds)
        return capacity if at_least is None else capacity.union(at_least)

    def allocate(
        self, neighbors: NeighborList, atomic_numbers: Int[Array, " atoms"], previous: ShardedNeighborList | None = None
    ) -> ShardedNeighborList:
        """Size the capacities for `neighbors` (host; not jit-able) and partition it.

        **Arguments:**

        - `neighbors`: a freshly allocated candidate list.
        - `atomic_numbers`: `(atoms,)` atomic numbers.
        - `previous`: an overflowed list to grow from (its capacities and peaks are covered,
          with `REALLOCATION_HEADROOM` more edges and rows).

        **Returns:**

        The partitioned list, with `capacity_multiplier` head-room on edges and halo rows.
        """
        num_atoms = neighbors.reference_positions.shape[0]
        peak_edges, peak_halo = _peaks_jit(self, neighbors)
        at_least, headroom = None, 0
        if previous is not None:
            at_least, headroom = previous.capacity, REALLOCATION_HEADROOM
            peak_edges = jnp.maximum(peak_edges, previous.peak_edges)
            peak_halo = jnp.maximum(peak_halo, previous.peak_halo)
        capacity = self.capacity_for(num_atoms, int(peak_edges), np.asarray(peak_halo), at_least, headroom)
        return _partition_jit(self, neighbors, atomic_numbers, capacity, None)

    def update(
        self, neighbors: NeighborList, previous: ShardedNeighborList, atomic_numbers: Int[Array, " atoms"]
    ) -> ShardedNeighborList:
        """Re-partition if `neighbors` was rebuilt since `previous` (jit-able), keep it otherwise.

        **Arguments:**

        - `neighbors`: the candidate list after its own update.
        - `previous`: the partitioned list before that update.
        - `atomic_numbers`: `(atoms,)` atomic numbers.

        **Returns:**

        The partitioned list; `partition_overflow` is sticky.
        """
        old = previous.neighbors
        rebuilt = jnp.any(neighbors.reference_positions != old.reference_positions) | jnp.any(
            neighbors.reference_cell != old.reference_cell
        )
        return jax.lax.cond(
            rebuilt,
            lambda: self.partition(neighbors, atomic_numbers, previous.capacity, previous),
            lambda: eqx.tree_at(lambda s: s.neighbors, previous, neighbors),
        )


@eqx.filter_jit
def _peaks_jit(partitioner: GraphPartitioner, neighbors: NeighborList) -> tuple[Int[Array, ""], Int[Array, " devices"]]:
    _, _, edge_counts, _, _, halo_counts = partitioner.needs(neighbors)
    return jnp.max(edge_counts), jnp.max(halo_counts, axis=0)


@eqx.filter_jit
def _partition_jit(partitioner, neighbors, atomic_numbers, capacity, previous):
    return partitioner.partition(neighbors, atomic_numbers, capacity, previous)


@eqx.filter_jit
def sharded_energy(
    model: UMA,
    mesh: Mesh,
    exchange: ExchangeMode,
    settings: ExecutionSettings,
    neighbors: ShardedNeighborList,
    positions: Float[Array, "atoms 3"],
    edge_mask: Bool[Array, " candidates"],
    cell: Float[Array, "1 3 3"],
    charge: Int[Array, " 1"],
    spin: Int[Array, " 1"],
    dataset_index: Int[Array, " 1"],
    strain: Float[Array, "1 3 3"],
) -> Float[Array, ""]:
    """One structure's energy, its partitioned graph evaluated over `mesh` (differentiable).

    **Arguments:**

    - `model`: the model, without MoLE routing (experts merged for the structure).
    - `mesh`: a 1-D mesh over [`GRAPH_AXIS`][uma_eqx.parallel.GRAPH_AXIS] with
      `neighbors.num_devices` devices.
    - `exchange`: `"halo"` or `"all_gather"` (see [`uma_eqx.parallel.HaloExchange`][]).
    - `settings`: how each device executes the model.
    - `neighbors`: the partitioned list.
    - `positions`: `(atoms, 3)` Cartesian positions, continuous with the list's reference.
    - `edge_mask`: `(candidates,)` which candidates are edges now (inside the cutoff).
    - `cell`: lattice vectors as rows.
    - `charge`, `spin`, `dataset_index`: the system's.
    - `strain`: deformation of the edge vectors (zeros for none).

    **Returns:**

    The energy in eV; `jax.grad` gives `dE/dpositions` and `dE/dstrain` through the collectives.
    """
    num_devices = mesh.shape[GRAPH_AXIS]
    capacity = neighbors.capacity
    if num_devices != neighbors.num_devices:
        raise ValueError(f"the list is partitioned over {neighbors.num_devices} devices, the mesh has {num_devices}")
    rows = jnp.where(neighbors.owned_mask[..., None], positions[neighbors.owned_atoms], 0.0)
    base = neighbors.neighbors
    tables = DeviceTables(
        atomic_numbers=neighbors.atomic_numbers,
        owned_mask=neighbors.owned_mask,
        halo_source=neighbors.halo_source,
        send_rows=neighbors.send_rows,
        edge_index=neighbors.edge_index,
        edge_shift=base.edge_shift[neighbors.edge_candidate].astype(positions.dtype),
        edge_mask=neighbors.edge_valid & edge_mask[neighbors.edge_candidate],
    )
    if not capacity.rounds:
        exchange = "all_gather"  # no halo: both modes are the same program
    params, static = eqx.partition(model, eqx.is_array)

    def local(params, positions, tables, cell, charge, spin, dataset_index, roll, strain):
        return _local_energy(
            eqx.combine(params, static), capacity, num_devices, exchange, settings,
            positions, tables, cell, charge, spin, dataset_index, roll, strain,
        )  # fmt: skip

    replicated, sharded = P(), P(GRAPH_AXIS)
    energy_fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, sharded, sharded, replicated, replicated, replicated, replicated, replicated, replicated),
        out_specs=replicated,
        check_vma=False,  # as in `_sharded_efs`: the model's scans start from mesh-unaware zeros
    )
    roll = jnp.zeros((), positions.dtype)
    energy = energy_fn(params, rows.reshape(-1, 3), tables, cell, charge, spin, dataset_index, roll, strain)
    return energy[0]
