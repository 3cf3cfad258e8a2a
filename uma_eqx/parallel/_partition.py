"""Spatial partition of one structure's atoms over devices, and the halo each device needs.

Host-side (numpy) geometry for graph parallelism: which device owns which atom, which edges
each device evaluates (those whose target it owns), which remote source atoms it must
receive before every layer (its halo), and how those rows travel (ppermute rounds). The
device side is `uma_eqx.parallel._graph_parallel`.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from jaxtyping import Bool, Float, Int

from .._graph import bucket_size

PartitionMethod = Literal["morton", "slab"]

#: Bits per axis of the Morton key: three axes interleave into 63 bits of a uint64 (our choice:
#: a 2**21 grid resolves 1M atoms in a 200 Å box to 1e-4 Å, far below interatomic distances).
_MORTON_BITS = 21


@dataclasses.dataclass(frozen=True)
class PartitionCapacity:
    """Fixed per-device sizes of a partitioned graph: one compiled program per capacity.

    **Fields:**

    - `owned`: rows of owned atoms per device (at least 1; padding rows are masked).
    - `edges`: edges per device (at least 1; padding edges are masked).
    - `rounds`: the halo exchange, one `(shift, rows)` per ppermute round: in round `shift`
      device `d` sends `rows` of its owned rows to device `(d + shift) % devices`. The halo of
      every device is the concatenation of the rounds' received rows (`halo` rows in all).
    """

    owned: int
    edges: int
    rounds: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if self.owned < 1 or self.edges < 1:
            raise ValueError(f"PartitionCapacity needs owned >= 1 and edges >= 1, got {self}")
        shifts = [k for k, _ in self.rounds]
        if shifts != sorted(set(shifts)) or any(k < 1 or rows < 1 for k, rows in self.rounds):
            raise ValueError(
                f"PartitionCapacity.rounds={self.rounds!r} must hold increasing shifts >= 1 with rows >= 1"
            )

    @property
    def halo(self) -> int:
        """Halo rows per device (all rounds)."""
        return sum(rows for _, rows in self.rounds)

    def fits(self, needed: "PartitionCapacity") -> bool:
        """Whether a partition that needs `needed` fits these capacities."""
        mine = dict(self.rounds)
        return (
            needed.owned <= self.owned
            and needed.edges <= self.edges
            and all(rows <= mine.get(k, 0) for k, rows in needed.rounds)
        )

    def union(self, other: "PartitionCapacity") -> "PartitionCapacity":
        """The smallest capacity that both `self` and `other` fit."""
        rounds = dict(self.rounds)
        for k, rows in other.rounds:
            rounds[k] = max(rows, rounds.get(k, 0))
        return PartitionCapacity(
            max(self.owned, other.owned), max(self.edges, other.edges), tuple(sorted(rounds.items()))
        )

    def bucketed(self) -> "PartitionCapacity":
        """Every size rounded up with [`uma_eqx.bucket_size`][] (at most 25% more), so that a
        moving structure keeps one compiled program for many steps."""
        return PartitionCapacity(
            bucket_size(self.owned),
            bucket_size(self.edges),
            tuple((k, bucket_size(rows)) for k, rows in self.rounds),
        )


@dataclasses.dataclass(frozen=True)
class ExchangeVolume:
    """Rows and bytes that one layer's halo refresh moves between devices.

    **Fields:**

    - `num_devices`: devices of the partition.
    - `row_bytes`: bytes of one atom's feature row, `(lmax + 1)**2 * sphere_channels * itemsize`.
    - `owned_atoms`: `(devices,)` atoms each device owns.
    - `halo_atoms`: `(devices,)` remote source atoms each device needs (its halo).
    - `owned_capacity`: owned rows per device (what every device contributes to an all-gather).
    - `rounds`: `(shift, rows)` of the halo exchange's ppermute rounds (see
      [`PartitionCapacity`][uma_eqx.parallel.PartitionCapacity]).

    Byte counts are per layer and count only rows that leave their device.
    """

    num_devices: int
    row_bytes: int
    owned_atoms: Int[np.ndarray, " devices"]
    halo_atoms: Int[np.ndarray, " devices"]
    owned_capacity: int
    rounds: tuple[tuple[int, int], ...]

    @property
    def all_gather_bytes_per_device(self) -> int:
        """`exchange="all_gather"`: bytes each device receives, `(devices - 1) owned_capacity row_bytes`."""
        return (self.num_devices - 1) * self.owned_capacity * self.row_bytes

    @property
    def all_gather_bytes(self) -> int:
        """`exchange="all_gather"`: bytes received by all devices together."""
        return self.num_devices * self.all_gather_bytes_per_device

    @property
    def halo_bytes_per_device(self) -> int:
        """`exchange="halo"`: bytes each device receives (padded rounds: `sum(rows) row_bytes`)."""
        return sum(rows for _, rows in self.rounds) * self.row_bytes

    @property
    def halo_bytes(self) -> int:
        """`exchange="halo"`: bytes received by all devices together (padded rounds)."""
        return self.num_devices * self.halo_bytes_per_device

    @property
    def needed_bytes(self) -> int:
        """Bytes of the halo rows themselves (all devices): what an exchange without padding moves."""
        return int(np.sum(self.halo_atoms)) * self.row_bytes

    def as_dict(self) -> dict:
        """Plain numbers (for tables and JSON)."""
        return {
            "num_devices": self.num_devices,
            "row_bytes": self.row_bytes,
            "owned_atoms_max": int(np.max(self.owned_atoms)),
            "halo_atoms_max": int(np.max(self.halo_atoms)),
            "halo_atoms_total": int(np.sum(self.halo_atoms)),
            "halo_rounds": len(self.rounds),
            "all_gather_bytes": self.all_gather_bytes,
            "all_gather_bytes_per_device": self.all_gather_bytes_per_device,
            "halo_bytes": self.halo_bytes,
            "halo_bytes_per_device": self.halo_bytes_per_device,
            "needed_bytes": self.needed_bytes,
        }


@dataclasses.dataclass(frozen=True)
class GraphPartition:
    """One structure's graph split over devices: per-device tables, stacked `(devices, ...)`.

    Device `d` holds a local graph of `owned + halo` rows: its owned atoms (rows
    `0 .. owned - 1`, in increasing atom index) followed by its halo (the remote source atoms
    of its edges, grouped by ppermute round). It evaluates the edges whose target it owns, in
    the global edge order; their local sources index owned or halo rows, their targets owned
    rows. Padding rows and edges are masked (index 0).

    **Fields:**

    - `capacity`: the fixed sizes (see [`PartitionCapacity`][uma_eqx.parallel.PartitionCapacity]).
    - `owner`, `local_row`: `(atoms,)` device and owned row of every atom.
    - `owned_atoms`, `owned_mask`: `(devices, owned)` atom of each owned row.
    - `halo_atoms`, `halo_mask`: `(devices, halo)` atom of each halo row.
    - `halo_source`: `(devices, halo)` row of each halo atom in the all-gathered owned rows
      (`owner * owned + local_row`).
    - `send_rows`: per round, `(devices, rows)` owned rows that device `d` sends.
    - `edge_source`, `edge_target`, `edge_shift`, `edge_mask`: `(devices, edges)` local edges.
    - `edge_index`: `(devices, edges)` index of each local edge in the global graph.
    """

    capacity: PartitionCapacity
    owner: Int[np.ndarray, " atoms"]
    local_row: Int[np.ndarray, " atoms"]
    owned_atoms: Int[np.ndarray, "devices owned"]
    owned_mask: Bool[np.ndarray, "devices owned"]
    halo_atoms: Int[np.ndarray, "devices halo"]
    halo_mask: Bool[np.ndarray, "devices halo"]
    halo_source: Int[np.ndarray, "devices halo"]
    send_rows: tuple[Int[np.ndarray, "devices rows"], ...]
    edge_source: Int[np.ndarray, "devices edges"]
    edge_target: Int[np.ndarray, "devices edges"]
    edge_shift: Float[np.ndarray, "devices edges 3"]
    edge_mask: Bool[np.ndarray, "devices edges"]
    edge_index: Int[np.ndarray, "devices edges"]

    @property
    def num_devices(self) -> int:
        return self.owned_atoms.shape[0]

    def exchange_volume(self, row_bytes: int) -> ExchangeVolume:
        """Rows and bytes one layer's halo refresh moves, for feature rows of `row_bytes` bytes."""
        return ExchangeVolume(
            self.num_devices,
            int(row_bytes),
            self.owned_mask.sum(axis=1),
            self.halo_mask.sum(axis=1),
            self.capacity.owned,
            self.capacity.rounds,
        )


def _geometry(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> tuple[Float[np.ndarray, "atoms 3"], Float[np.ndarray, " 3"]]:
    """Coordinates in Å along the three lattice normals (from 0), and the extent along each.

    Periodic axes: wrapped fractional coordinates times the cell's perpendicular width (the
    extent is the width). Non-periodic axes: the same projection measured from the lowest atom
    (the extent is the atoms' spread). A structure without periodic axes uses the Cartesian axes.
    """
    frame = cell if pbc.any() else np.eye(3)
    frac = np.linalg.solve(frame.T, positions.T).T
    volume = abs(np.linalg.det(frame))
    cross = np.stack([np.cross(frame[1], frame[2]), np.cross(frame[2], frame[0]), np.cross(frame[0], frame[1])])
    widths = volume / np.linalg.norm(cross, axis=-1)
    frac = np.where(pbc, frac % 1.0, frac - (frac.min(axis=0) if len(frac) else 0.0))
    coords = frac * widths
    extent = np.where(pbc, widths, coords.max(axis=0) if len(coords) else 0.0)
    return coords, extent


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the low 21 bits of each `uint64` (one axis of a 3-D Morton key)."""
    v = v & np.uint64(0x1FFFFF)
    v = (v | (v << np.uint64(32))) & np.uint64(0x1F00000000FFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x1F0000FF0000FF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x100F00F00F00F00F)
    v = (v | (v << np.uint64(4))) & np.uint64(0x10C30C30C30C30C3)
    v = (v | (v << np.uint64(2))) & np.uint64(0x1249249249249249)
    return v


def assign_atoms(
    positions: Float[np.ndarray, "atoms 3"],
    cell: Float[np.ndarray, "3 3"],
    pbc: Sequence[bool] | np.ndarray,
    num_devices: int,
    method: PartitionMethod = "morton",
) -> Int[np.ndarray, " atoms"]:
    """The device that owns each atom: a spatial partition balanced by atom count.

    Atoms are ordered along a space curve and cut into `num_devices` consecutive runs whose
    sizes differ by at most one (`owner = floor(rank * devices / atoms)`); with more devices
    than atoms some devices own nothing (still a valid partition). Partitions may be thinner
    than the cutoff: halos follow from the edges, not from the geometry.

    - `"slab"`: order by the coordinate along the lattice normal of largest extent (the
      cell's perpendicular width along periodic axes, the atoms' spread along others).
    - `"morton"`: order by the Morton (Z-order) key of the coordinates along the three normals
      on one grid of equal spacing in Å (`2**21` steps over the largest extent), so that runs
      are compact blocks; for `2**k` devices and a uniform density they are boxes.

    **Arguments:**

    - `positions`: `(atoms, 3)` Cartesian positions in Å.
    - `cell`: lattice vectors as rows (used along periodic axes).
    - `pbc`: periodicity per axis.
    - `num_devices`: number of parts, `>= 1`.
    - `method`: `"morton"` or `"slab"`.

    **Returns:**

    `(atoms,)` owner in `0 .. num_devices - 1`.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} is invalid: use an int >= 1")
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    coords, extent = _geometry(positions, np.asarray(cell, np.float64), pbc)
    match method:
        case "slab":
            key = coords[:, int(np.argmax(extent))]
        case "morton":
            step = max(float(extent.max()), 1e-12) / (2**_MORTON_BITS - 1)
            q = np.clip(np.floor(coords / step), 0, 2**_MORTON_BITS - 1).astype(np.uint64)
            key = (
                _spread_bits(q[:, 0])
                | (_spread_bits(q[:, 1]) << np.uint64(1))
                | (_spread_bits(q[:, 2]) << np.uint64(2))
            )
        case other:
            raise ValueError(f"unknown partition method {other!r}: use 'morton' or 'slab'")
    order = np.argsort(key, kind="stable")
    num_atoms = positions.shape[0]
    owner = np.empty(num_atoms, np.int64)
    owner[order] = (np.arange(num_atoms, dtype=np.int64) * num_devices) // max(num_atoms, 1)
    return owner


def _halo_entries(
    owner: np.ndarray, source: np.ndarray, target: np.ndarray, num_devices: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (device, remote source atom) pair, sorted by device, round and atom.

    **Returns:**

    `(device, atom, shift, counts)`: the entries and `counts[d, k]`, the rows device `d`
    receives in the round of shift `k` (from device `(d - k) % devices`).
    """
    num_atoms = owner.shape[0]
    device = owner[target]
    remote = owner[source] != device
    keys = np.unique(device[remote] * num_atoms + source[remote])
    hdev, hatom = keys // num_atoms, keys % num_atoms
    shift = (hdev - owner[hatom]) % num_devices
    order = np.lexsort((hatom, shift, hdev))
    hdev, hatom, shift = hdev[order], hatom[order], shift[order]
    counts = np.bincount(hdev * num_devices + shift, minlength=num_devices * num_devices).reshape(
        num_devices, num_devices
    )
    return hdev, hatom, shift, counts


def _rounds(counts: np.ndarray) -> tuple[tuple[int, int], ...]:
    """`(shift, rows)` of every round that moves a row: rows = the largest receive of that shift."""
    rows = counts.max(axis=0) if counts.size else np.zeros(0, np.int64)
    return tuple((int(k), int(rows[k])) for k in range(1, counts.shape[1]) if rows[k] > 0)


def _positions_in_groups(groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For sorted group labels: each item's position inside its group, and the group sizes."""
    sizes = np.bincount(groups, minlength=num_groups)
    starts = np.cumsum(sizes) - sizes
    return np.arange(groups.shape[0]) - starts[groups], sizes


def partition_graph(
    owner: Int[np.ndarray, " atoms"],
    edge_index: Int[np.ndarray, "2 edges"],
    edge_shift: Float[np.ndarray, "edges 3"],
    num_devices: int,
    capacity: PartitionCapacity | None = None,
) -> GraphPartition:
    """Split a graph's (real) edges by the owner of their target and lay out each device's halo.

    **Arguments:**

    - `owner`: `(atoms,)` device of every atom (e.g. from [`assign_atoms`][uma_eqx.parallel.assign_atoms]).
    - `edge_index`: `(2, edges)` sources and targets of the real edges, in the graph's order.
    - `edge_shift`: `(edges, 3)` their image shifts.
    - `num_devices`: devices of the partition.
    - `capacity`: fixed sizes to lay the tables out in; `None`: the smallest that fit.

    **Returns:**

    The [`GraphPartition`][uma_eqx.parallel.GraphPartition].

    **Raises:**

    `ValueError` when the partition needs more than `capacity` (naming the sizes needed), or
    when `owner` names a device outside `0 .. num_devices - 1`.
    """
    owner = np.asarray(owner, np.int64)
    source, target = (np.asarray(a, np.int64) for a in edge_index)
    edge_shift = np.asarray(edge_shift, np.float64).reshape(-1, 3)
    num_atoms, d = owner.shape[0], num_devices
    if num_atoms and (owner.min() < 0 or owner.max() >= d):
        raise ValueError(f"owner has entries outside 0..{d - 1}: assign each atom one of the {d} devices")

    # owned rows: each device's atoms in increasing index (so edges sorted by target stay sorted)
    by_owner = np.argsort(owner, kind="stable")
    local_sorted, owned_counts = _positions_in_groups(owner[by_owner], d)
    local_row = np.empty(num_atoms, np.int64)
    local_row[by_owner] = local_sorted

    hdev, hatom, shift, counts = _halo_entries(owner, source, target, d)
    edge_device = owner[target]
    edge_counts = np.bincount(edge_device, minlength=d)
    needed = PartitionCapacity(
        max(1, int(owned_counts.max(initial=0))), max(1, int(edge_counts.max(initial=0))), _rounds(counts)
    )
    if capacity is None:
        capacity = needed
    elif not capacity.fits(needed):
        raise ValueError(
            f"the partition needs {needed}, more than the capacity {capacity}: pass capacity=None, or "
            "capacity.union(needed).bucketed() to reallocate"
        )
    oc, hc, ec = capacity.owned, capacity.halo, capacity.edges

    owned_atoms = np.zeros((d, oc), np.int64)
    owned_mask = np.zeros((d, oc), bool)
    owned_atoms[owner[by_owner], local_sorted] = by_owner
    owned_mask[owner[by_owner], local_sorted] = True

    # halo rows: the concatenation of the rounds' receive buffers, in `capacity.rounds` order
    round_offset = {k: off for (k, _), off in zip(capacity.rounds, np.cumsum([0] + [r for _, r in capacity.rounds]))}
    position, _ = _positions_in_groups(hdev * d + shift, d * d)
    offsets = np.zeros(d, np.int64)
    for k, off in round_offset.items():
        offsets[k] = off
    slot = offsets[shift] + position
    halo_atoms = np.zeros((d, hc), np.int64)
    halo_mask = np.zeros((d, hc), bool)
    halo_source = np.zeros((d, hc), np.int64)
    halo_atoms[hdev, slot] = hatom
    halo_mask[hdev, slot] = True
    halo_source[hdev, slot] = owner[hatom] * oc + local_row[hatom]
    send_rows = []
    for k, rows in capacity.rounds:
        table = np.zeros((d, rows), np.int64)
        here = shift == k
        table[owner[hatom[here]], position[here]] = local_row[hatom[here]]
        send_rows.append(table)

    # edges: each device's, in the global order; sources local (owned row, or owned + halo slot)
    lookup_key = hdev * num_atoms + hatom  # ordered by (device, shift, atom): sort for searchsorted
    lookup_order = np.argsort(lookup_key, kind="stable")
    lookup_sorted = lookup_key[lookup_order]
    edge_key = edge_device * num_atoms + source
    remote = owner[source] != edge_device
    local_source = local_row[source].copy()
    found = np.searchsorted(lookup_sorted, edge_key[remote])
    local_source[remote] = oc + slot[lookup_order[found]]
    by_device = np.argsort(edge_device, kind="stable")
    edge_position, _ = _positions_in_groups(edge_device[by_device], d)
    rows_d = edge_device[by_device]
    e_source = np.zeros((d, ec), np.int64)
    e_target = np.zeros((d, ec), np.int64)
    e_shift = np.zeros((d, ec, 3), np.float64)
    e_mask = np.zeros((d, ec), bool)
    e_index = np.zeros((d, ec), np.int64)
    e_source[rows_d, edge_position] = local_source[by_device]
    e_target[rows_d, edge_position] = local_row[target[by_device]]
    e_shift[rows_d, edge_position] = edge_shift[by_device]
    e_mask[rows_d, edge_position] = True
    e_index[rows_d, edge_position] = by_device
    return GraphPartition(
        capacity,
        owner,
        local_row,
        owned_atoms,
        owned_mask,
        halo_atoms,
        halo_mask,
        halo_source,
        tuple(send_rows),
        e_source,
        e_target,
        e_shift,
        e_mask,
        e_index,
    )


def exchange_volume(
    positions: Float[np.ndarray, "atoms 3"],
    cell: Float[np.ndarray, "3 3"],
    pbc: Sequence[bool] | np.ndarray,
    cutoff: float,
    num_devices: int,
    row_bytes: int,
    method: PartitionMethod = "morton",
) -> ExchangeVolume:
    """Halo atoms and bytes exchanged per layer, from the geometry alone (no model, no device).

    The partition of [`assign_atoms`][uma_eqx.parallel.assign_atoms] and the halo of every
    pair closer than `cutoff` (vesin's half neighbour list, images included), exactly as
    [`energy_forces_stress_sharded`][uma_eqx.parallel.energy_forces_stress_sharded] lays them
    out, without the model's neighbour cap (which only matters for atoms with more than
    `max_neighbors` neighbours). Costs one neighbour list: about a second per million pairs.

    **Arguments:**

    - `positions`, `cell`, `pbc`: the structure (Å).
    - `cutoff`: the model's cutoff in Å.
    - `num_devices`: devices of the partition.
    - `row_bytes`: bytes of one feature row (see [`feature_row_bytes`][uma_eqx.parallel.feature_row_bytes]).
    - `method`: partition method (`"morton"` or `"slab"`).

    **Returns:**

    The [`ExchangeVolume`][uma_eqx.parallel.ExchangeVolume] (exact capacities, no bucketing).
    """
    import vesin

    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,)).copy()
    owner = assign_atoms(positions, cell, pbc, num_devices, method)
    box = cell if pbc.any() else np.eye(3)
    i, j = vesin.NeighborList(cutoff=float(cutoff), full_list=False).compute(
        points=positions, box=box, periodic=pbc, quantities="ij"
    )
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    cross = owner[i] != owner[j]
    i, j = i[cross], j[cross]
    source, target = np.concatenate([i, j]), np.concatenate([j, i])
    _, _, _, counts = _halo_entries(owner, source, target, num_devices)
    owned = np.bincount(owner, minlength=num_devices)
    return ExchangeVolume(
        num_devices,
        int(row_bytes),
        owned,
        counts.sum(axis=1),
        max(1, int(owned.max(initial=0))),
        _rounds(counts),
    )


def feature_row_bytes(config, dtype) -> int:
    """Bytes of one atom's node features, `(lmax + 1)**2 * sphere_channels * itemsize`.

    **Arguments:**

    - `config`: a `UMAConfig` (or anything with `lmax` and `sphere_channels`).
    - `dtype`: the feature dtype (the model's).

    **Returns:**

    The bytes one halo row costs per layer.
    """
    return (config.lmax + 1) ** 2 * config.sphere_channels * np.dtype(dtype).itemsize
