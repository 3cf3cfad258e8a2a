"""JAX-MD integration: UMA energy functions and an in-jit neighbour list in JAX-MD's conventions.

Units are UMA's: energy eV, length Å, mass amu, so JAX-MD's time unit is
`Å·sqrt(amu/eV) ≈ 10.18 fs` (use [`uma_eqx.jax_md.FEMTOSECOND`][]) and temperatures enter as
`kT` in eV (use [`uma_eqx.jax_md.BOLTZMANN`][]).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import ase
import ase.units
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int

from ._graph import AtomicGraph
from ._potential import UMA, merge_experts_for
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .neighbors import NeighborList, NeighborListFns
from .neighbors._jax import DEFAULT_CAPACITY_MULTIPLIER, DEFAULT_SKIN
from .parallel._data import Device
from .parallel._graph_parallel import ExchangeMode, make_mesh
from .parallel._md import GraphPartitioner, ShardedNeighborList, sharded_energy
from .parallel._partition import PartitionMethod

#: One femtosecond in JAX-MD time units when energies are eV, lengths Å and masses amu
#: (`ase.units.fs`).
FEMTOSECOND = float(ase.units.fs)
#: Boltzmann's constant in eV/K (`ase.units.kB`).
BOLTZMANN = float(ase.units.kB)


def box_from_atoms(atoms: ase.Atoms) -> Float[np.ndarray, "3 3"]:
    """JAX-MD's `box` for `space.periodic_general`: the lattice vectors as **columns**.

    ASE (and [`uma_eqx.AtomicGraph`][]) store them as rows; JAX-MD maps fractional to
    Cartesian coordinates with `r = box @ f`, so `box = cell.T`.
    """
    return np.asarray(atoms.get_cell(complete=True), dtype=np.float64).T


def _cell_from_box(box: ArrayLike) -> Float[Array, "3 3"]:
    """Lattice vectors as rows from a JAX-MD box (a `(3, 3)` matrix, a `(3,)` or a scalar)."""
    box = jnp.asarray(box)
    if box.ndim == 0:
        return box * jnp.eye(3, dtype=box.dtype)
    if box.ndim == 1:
        return jnp.diag(box)
    return box.T


@jax.custom_jvp
def _to_cartesian(fractional: Float[Array, "atoms 3"], cell: Float[Array, "3 3"]) -> Float[Array, "atoms 3"]:
    """`r = f H`, differentiated JAX-MD's way: `d/df` is the identity.

    JAX-MD's integrators treat `-dU/dR` as the Cartesian force also when `R` is fractional;
    its `space.transform` makes that true with this same derivative rule (tangent
    `df + f dH`), so forces and momenta stay Cartesian (`jax_md/space.py:transform`).
    """
    return fractional @ cell


@_to_cartesian.defjvp
def _to_cartesian_jvp(primals, tangents):
    fractional, cell = primals
    d_fractional, d_cell = tangents
    return _to_cartesian(fractional, cell), d_fractional + fractional @ d_cell


class UMANeighborFn(eqx.Module):
    """JAX-MD-style `allocate`/`update` for UMA's neighbour list, in JAX-MD coordinates.

    Wraps a [`uma_eqx.neighbors.NeighborListFns`][]: positions are Cartesian, or fractional
    when `fractional_coordinates=True` (as `space.periodic_general(...,
    fractional_coordinates=True)` and `simulate.npt_nose_hoover` use); `box` follows JAX-MD
    (lattice vectors as columns). Built by [`uma_eqx.jax_md.energy_and_neighbor_fns`][].
    """

    fns: NeighborListFns = eqx.field(static=True)
    box: Float[Array, "3 3"]
    fractional_coordinates: bool = eqx.field(static=True)

    def cartesian(
        self, positions: Float[Array, "atoms 3"], box: Float[Array, "3 3"] | None = None
    ) -> tuple[Float[Array, "atoms 3"], Float[Array, "3 3"]]:
        """Cartesian positions (Å) and the cell (lattice vectors as rows) of JAX-MD coordinates.

        **Arguments:**

        - `positions`: positions in this list's coordinates (fractional or Cartesian).
        - `box`: JAX-MD box (lattice vectors as columns); `None` for the default box.

        **Returns:**

        `(cartesian_positions, cell)`; with fractional coordinates the map carries JAX-MD's
        derivative rule (forces stay Cartesian).
        """
        cell = _cell_from_box(self.box if box is None else box).astype(positions.dtype)
        return (_to_cartesian(positions, cell) if self.fractional_coordinates else positions), cell

    def allocate(self, positions: Float[Array, "atoms 3"], box=None, extra_capacity: int = 0) -> NeighborList:
        """Build a list sized for `positions` (host; see `NeighborListFns.allocate`)."""
        positions = jnp.asarray(positions)
        if not bool(jnp.all(jnp.isfinite(positions))):
            bad = int(np.argwhere(~np.isfinite(np.asarray(positions)))[0, 0])
            raise ValueError(f"position of atom {bad} is not finite; fix the structure before building neighbours.")
        r, cell = self.cartesian(positions, box)
        return self.fns.allocate(r, cell, extra_capacity)

    def update(self, positions: Float[Array, "atoms 3"], neighbors: NeighborList, box=None) -> NeighborList:
        """Rebuild if needed (jit-able; see `NeighborListFns.update`)."""
        r, cell = self.cartesian(positions, box)
        return self.fns.update(r, neighbors, cell)


class ShardedNeighborFn(eqx.Module):
    """JAX-MD-style `allocate`/`update` of a neighbour list partitioned over devices.

    The list of a [`uma_eqx.jax_md.UMANeighborFn`][] (`base`), re-partitioned over the
    devices at every rebuild by `partitioner` (see `uma_eqx.parallel._md.GraphPartitioner`):
    atoms are re-assigned to devices, so those that crossed a partition boundary migrate.
    Exceeding the candidate buffer or any per-device capacity (edges, halo rows per round)
    sets `did_buffer_overflow`; [`uma_eqx.jax_md.run`][] then grows the capacities and reruns
    the chunk. Built by [`uma_eqx.jax_md.energy_and_neighbor_fns`][] with `devices=`.
    """

    base: UMANeighborFn
    atomic_numbers: Int[Array, " atoms"]
    partitioner: GraphPartitioner = eqx.field(static=True)

    @property
    def fns(self) -> NeighborListFns:
        """The whole structure's candidate search (see [`uma_eqx.neighbors.NeighborListFns`][])."""
        return self.base.fns

    def cartesian(
        self, positions: Float[Array, "atoms 3"], box: Float[Array, "3 3"] | None = None
    ) -> tuple[Float[Array, "atoms 3"], Float[Array, "3 3"]]:
        """Cartesian positions and the cell (rows) of JAX-MD coordinates (see `UMANeighborFn.cartesian`)."""
        return self.base.cartesian(positions, box)

    def allocate(self, positions: Float[Array, "atoms 3"], box=None, extra_capacity: int = 0) -> ShardedNeighborList:
        """Build the list and its partition, sized for `positions` (host).

        **Arguments:**

        - `positions`: positions in JAX-MD coordinates.
        - `box`: JAX-MD box; `None` for the default.
        - `extra_capacity`: candidate slots on top of `capacity_multiplier x count`.

        **Returns:**

        The `uma_eqx.parallel._md.ShardedNeighborList`, with `capacity_multiplier` head-room on
        the candidates and on every device's edges and halo rows.
        """
        neighbors = self.base.allocate(positions, box, extra_capacity)
        return self.partitioner.allocate(neighbors, self.atomic_numbers)

    def reallocate(
        self, positions: Float[Array, "atoms 3"], overflowed: ShardedNeighborList, box=None
    ) -> ShardedNeighborList:
        """A larger list after `overflowed` overflowed (host; used by [`uma_eqx.jax_md.run`][]).

        **Arguments:**

        - `positions`: positions where it overflowed.
        - `overflowed`: the list that overflowed (its capacities and the peak sizes it met).
        - `box`: JAX-MD box there.

        **Returns:**

        A list built at `positions` whose capacities cover `overflowed`'s and the peaks it met,
        with head-room.
        """
        extra = max(math.ceil(overflowed.neighbors.capacity * (self.fns.capacity_multiplier - 1.0)), 16)
        neighbors = self.base.allocate(positions, box, extra_capacity=extra)
        return self.partitioner.allocate(neighbors, self.atomic_numbers, previous=overflowed)

    def update(
        self, positions: Float[Array, "atoms 3"], neighbors: ShardedNeighborList, box=None
    ) -> ShardedNeighborList:
        """Rebuild and re-partition if needed (jit-able; see `NeighborListFns.update`)."""
        rebuilt = self.base.update(positions, neighbors.neighbors, box)
        return self.partitioner.update(rebuilt, neighbors, self.atomic_numbers)


def _candidate_graph(neighbor_fn, template: AtomicGraph, R, neighbor: NeighborList, box) -> AtomicGraph:
    """The graph of JAX-MD coordinates `R` on `neighbor`'s candidate edges (edge mask not yet cut
    to the cutoff: see `NeighborListFns.graph_mask`), with `template`'s atoms and system."""
    positions, cell = neighbor_fn.cartesian(jnp.asarray(R), box)
    positions = neighbor_fn.fns.unwrap(positions, neighbor, cell)  # the images the list was built for
    return AtomicGraph(
        positions=positions,
        atomic_numbers=template.atomic_numbers,
        system_index=template.system_index,
        edge_index=neighbor.edge_index,
        edge_shift=neighbor.edge_shift.astype(positions.dtype),
        cell=cell[None],
        charge=template.charge,
        spin=template.spin,
        dataset_index=template.dataset_index,
        atom_mask=template.atom_mask,
        edge_mask=neighbor.edge_mask,
        system_mask=template.system_mask,
    )


def energy_and_neighbor_fns(
    model: UMA,
    atoms: ase.Atoms,
    *,
    task_name: str,
    fractional_coordinates: bool = False,
    skin: float = DEFAULT_SKIN,
    capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
    merge: bool = True,
    settings: ExecutionSettings | None = None,
    neighbor_method: Literal["auto", "all_pairs", "cell_list"] = "auto",
    devices: Sequence[Device] | None = None,
    exchange: ExchangeMode = "halo",
    partition: PartitionMethod = "morton",
) -> tuple[Callable[..., Float[Array, ""]], "UMANeighborFn | ShardedNeighborFn"]:
    """A JAX-MD energy function of `model` for the atoms of `atoms`, and its neighbour list.

    The composition, charge, spin (from `atoms.info`, fairchem's defaults), periodicity and
    task are fixed; positions (and, for NPT, the box) vary. The energy function has JAX-MD's
    signature `energy_fn(R, neighbor=nbrs, box=None, perturbation=None)` and works with
    `simulate.nve`, `nvt_nose_hoover`, `nvt_langevin`, `npt_nose_hoover` (pass the box, use
    fractional coordinates), `minimize.fire_descent` and `quantity.stress`/`pressure`. Its
    graph has exactly the host graph's edges (fairchem's inclusive cutoff), so energies equal
    [`uma_eqx.energy_forces_stress`][] on `AtomicGraph.from_atoms`. With fractional `R`,
    `-grad(energy_fn)` is the Cartesian force, as JAX-MD's integrators expect.

    **Arguments:**

    - `model`: the model.
    - `atoms`: the structure that fixes numbers, charge, spin, pbc and the default box.
    - `task_name`: one of `model.config.task_names`.
    - `fractional_coordinates`: whether `R` is fractional (JAX-MD's `periodic_general` with
        `fractional_coordinates=True`) or Cartesian Å.
    - `skin`: Verlet skin in Å.
    - `capacity_multiplier`: neighbour-buffer head-room.
    - `merge`: merge MoLE experts for this fixed composition (faster, same energies up to
        round-off); `False` also when `settings.merge_experts` is `False`.
    - `settings`: how to execute the model (see [`uma_eqx.ExecutionSettings`][]).
    - `neighbor_method`: the neighbour list's candidate search (see
        [`uma_eqx.neighbors.NeighborListFns`][]): all pairs, a cell list, or `"auto"`.
    - `devices`: `None` (default): one device. A sequence of devices: graph parallelism over
        a 1-D mesh of them. The candidate list (searched on every device alike) is partitioned
        at every rebuild: atoms are re-assigned to devices by `partition`, each device
        evaluates the edges whose target it owns and refreshes its halo before every block
        (see `uma_eqx.parallel.energy_forces_stress_sharded`, the same per-device model
        call), all in capacities fixed at `allocate`. The neighbour function is then a
        `uma_eqx.jax_md.ShardedNeighborFn`; `-grad` and the stress through `perturbation`
        go through the collectives. Needs the experts merged (`merge=True`). Where the
        single-device energy raises (an overflowed list, an atom above `max_neighbors`), this
        energy and its gradient are NaN (an error cannot be raised from inside a multi-device
        program), so [`uma_eqx.jax_md.run`][] stops with `FloatingPointError`.
    - `exchange`: with `devices`, how halo rows travel: `"halo"` (ppermute rounds, fixed rows
        per round) or `"all_gather"`.
    - `partition`: with `devices`, how atoms are assigned: `"morton"` (Z-order blocks) or
        `"slab"` (slabs along the widest lattice normal), balanced by count.

    **Returns:**

    `(energy_fn, neighbor_fn)`.

    **Raises:**

    `ValueError` for an unknown task, elements outside the model, a partly periodic system
    with `fractional_coordinates=True`, or anything [`uma_eqx.AtomicGraph.from_atoms`][]
    refuses (empty structure, NaN positions, degenerate cell, bad charge/spin); with
    `devices`, for an empty device list, an unknown `exchange` or `partition`, or a MoLE model
    with `merge=False`.
    """
    cfg = model.config
    settings = DEFAULT_SETTINGS if settings is None else settings
    template = AtomicGraph.for_model(model, atoms, task_name)
    pbc = (bool(atoms.pbc[0]), bool(atoms.pbc[1]), bool(atoms.pbc[2]))
    if fractional_coordinates and not all(pbc):
        raise ValueError(f"fractional_coordinates=True needs a periodic system, got pbc={list(pbc)}.")
    if merge and settings.merge_experts and model.backbone.router is not None:
        model = merge_experts_for(model, template)
    fns = NeighborListFns(
        cutoff=cfg.cutoff,
        pbc=pbc,
        skin=skin,
        capacity_multiplier=capacity_multiplier,
        max_neighbors=cfg.max_neighbors,
        method=neighbor_method,
    )
    default_box = jnp.asarray(box_from_atoms(atoms), model.dtype)
    neighbor_fn = UMANeighborFn(fns, default_box, fractional_coordinates)
    far = cfg.cutoff + 1.0  # fairchem's fake-edge distance (escn_md.py:add_n_empty_edges)
    if devices is not None:
        return _sharded_energy_fn(
            model, template, neighbor_fn, devices, exchange, partition, settings, capacity_multiplier, far
        )

    def energy_fn(R, neighbor: NeighborList, box=None, perturbation=None, **unused) -> Float[Array, ""]:
        graph = _candidate_graph(neighbor_fn, template, R, neighbor, box)
        positions = graph.positions
        mask, over_cap = fns.graph_mask(neighbor, graph.edge_vectors(far))
        graph = eqx.tree_at(lambda g: g.edge_mask, graph, mask)
        strain = None if perturbation is None else _strain(perturbation, positions.dtype)
        energy = model(graph, strain=strain, settings=settings)[0]
        energy = eqx.error_if(
            energy,
            over_cap,
            f"an atom has more than max_neighbors={cfg.max_neighbors} neighbours within the cutoff; "
            "fairchem then caps its neighbours, which the in-jit list does not do: use UMACalculator",
        )
        return eqx.error_if(
            energy,
            neighbor.did_buffer_overflow,
            "neighbour buffer overflowed: reallocate with neighbor_fn.allocate (uma_eqx.jax_md.run does it)",
        )

    return energy_fn, neighbor_fn


def _strain(perturbation: ArrayLike, dtype) -> Float[Array, "1 3 3"]:
    """Our strain (`dR_row @ (I + strain)`) of JAX-MD's `perturbation` (`dR -> perturbation @ dR`,
    column vectors); a scalar (npt_nose_hoover's isotropic `1 + eps`) scales every vector."""
    deform = jnp.asarray(perturbation, dtype)
    eye = jnp.eye(3, dtype=dtype)
    deform = deform * eye if deform.ndim == 0 else deform
    return (deform.T - eye)[None]


def _sharded_energy_fn(
    model: UMA,
    template: AtomicGraph,
    neighbor_fn: UMANeighborFn,
    devices: Sequence[Device],
    exchange: ExchangeMode,
    partition: PartitionMethod,
    settings: ExecutionSettings,
    capacity_multiplier: float,
    far: float,
) -> tuple[Callable[..., Float[Array, ""]], "ShardedNeighborFn"]:
    """`energy_and_neighbor_fns` over a mesh of `devices` (graph parallel); see there."""
    if exchange not in ("all_gather", "halo"):
        raise ValueError(f"unknown exchange {exchange!r}: use 'all_gather' or 'halo'")
    if model.backbone.router is not None:
        raise ValueError(
            "devices=... needs the MoLE experts merged for the structure: pass merge=True and settings with "
            "merge_experts=True"
        )
    mesh = make_mesh(devices)
    fns = neighbor_fn.fns
    partitioner = GraphPartitioner(len(mesh.devices.flat), fns.pbc, partition, capacity_multiplier)
    sharded_fn = ShardedNeighborFn(neighbor_fn, template.atomic_numbers, partitioner)

    def energy_fn(R, neighbor: ShardedNeighborList, box=None, perturbation=None, **unused) -> Float[Array, ""]:
        return _sharded_md_energy(
            model, template, neighbor_fn, mesh, exchange, settings, far, R, neighbor, box, perturbation
        )

    return energy_fn, sharded_fn


@eqx.filter_jit
def _sharded_md_energy(
    model: UMA,
    template: AtomicGraph,
    neighbor_fn: UMANeighborFn,
    mesh,
    exchange: ExchangeMode,
    settings: ExecutionSettings,
    far: float,
    R: Float[Array, "atoms 3"],
    neighbor: ShardedNeighborList,
    box,
    perturbation,
) -> Float[Array, ""]:
    """The graph-parallel JAX-MD energy (one program: the whole graph's edge mask and the sharded model)."""
    fns = neighbor_fn.fns
    candidates = neighbor.neighbors
    graph = _candidate_graph(neighbor_fn, template, R, candidates, box)
    positions = graph.positions
    # No `graph.checked` / `eqx.error_if` here: an error raised inside a multi-device program
    # stops one device's thread while the others wait in a collective (the process hangs, then
    # aborts). The graph is valid by construction (the template was checked at construction, the
    # list's indices are in range); a list that cannot be evaluated poisons the energy instead.
    mask, over_cap = fns.graph_mask(candidates, graph.edge_vectors(far))
    dtype = positions.dtype
    strain = jnp.zeros((1, 3, 3), dtype) if perturbation is None else _strain(perturbation, dtype)
    energy = sharded_energy(
        model, mesh, exchange, settings, neighbor, graph.positions, mask, graph.cell,
        template.charge, template.spin, template.dataset_index, strain,
    )  # fmt: skip
    # NaN energy and forces (so `run` stops at once) for an overflowed list or an atom above
    # max_neighbors (see the single-device energy_fn's errors)
    return energy * jnp.where(over_cap | neighbor.did_buffer_overflow, jnp.nan, 1.0)


#: Reallocations of the neighbour list in a row (one chunk rerun each) before `run` gives up:
#: each grows the capacity by the list's multiplier, so a handful always suffices unless the
#: cell or density changes much faster than an MD step should allow. Our choice.
MAX_REALLOCATIONS = 8


@eqx.filter_jit
def _run_chunk(
    step_fn, neighbor_fn, observe, box_fn, state, neighbors, length: int, active: Int[Array, ""], observe_last: bool
):
    """`length` steps under `lax.scan` (compiled once per `length` and per function objects);
    steps from `active` on, and all steps after a neighbour overflow, are skipped. `observe`
    runs only on steps that ran with a valid list (and with `observe_last` only on the last
    active step); other entries are zeros."""

    def body(carry, i):
        s, nbrs = carry
        go = (i < active) & ~nbrs.did_buffer_overflow
        s = jax.lax.cond(go, lambda: step_fn(s, nbrs), lambda: s)
        box = None if box_fn is None else box_fn(s)
        nbrs = jax.lax.cond(go, lambda: neighbor_fn.update(s.position, nbrs, box), lambda: nbrs)
        if observe is None:
            return (s, nbrs), None
        want = go & ~nbrs.did_buffer_overflow
        if observe_last:
            want = want & (i == active - 1)
        shapes = jax.eval_shape(observe, s, nbrs)
        zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # noqa: E731
        return (s, nbrs), jax.lax.cond(want, lambda: observe(s, nbrs), zeros)

    (state, neighbors), outs = jax.lax.scan(body, (state, neighbors), jnp.arange(length))
    return state, neighbors, outs


def run(
    step_fn: Callable[[Any, Any], Any],
    state: Any,
    neighbors: NeighborList | ShardedNeighborList,
    neighbor_fn: "UMANeighborFn | ShardedNeighborFn",
    num_steps: int,
    *,
    steps_per_chunk: int = 100,
    observe: Callable[[Any, Any], Any] | None = None,
    observe_last: bool = False,
    box_fn: Callable[[Any], Array] | None = None,
    callback: Callable[[int, Any, Any], None] | None = None,
) -> tuple[Any, NeighborList | ShardedNeighborList, list]:
    """Run `num_steps` MD steps on the device, `steps_per_chunk` at a time under `lax.scan`.

    Each step is `state = step_fn(state, neighbors)` followed by a neighbour-list update. After
    each chunk the host checks two things: if the neighbour buffer overflowed, the list is
    reallocated (more capacity, and the periodic images the cell needed where it overflowed),
    brought up to date at the chunk's starting state, and the chunk is rerun, so no step ever
    runs with a list that overflowed (after `MAX_REALLOCATIONS` reruns in a row it raises
    `RuntimeError`); if positions became non-finite, it raises `FloatingPointError` naming the
    chunk, instead of carrying NaNs through the trajectory.

    The chunk is compiled once per `steps_per_chunk` and per function objects (`step_fn`,
    `observe`, `box_fn`): a shorter last chunk reuses it, and later `run` calls with the same
    function objects reuse it too (define the step function once rather than a new `lambda`
    per call when running in segments).

    **Arguments:**

    - `step_fn`: one MD step, e.g. `lambda s, nbrs: apply_fn(s, neighbor=nbrs)`.
    - `state`: a JAX-MD state with a `position` field.
    - `neighbors`: from `neighbor_fn.allocate`.
    - `neighbor_fn`: from [`uma_eqx.jax_md.energy_and_neighbor_fns`][].
    - `num_steps`: total steps.
    - `steps_per_chunk`: steps per compiled `lax.scan` (the host checks in between).
    - `observe`: optional `observe(state, neighbors) -> pytree` recorded every step.
    - `observe_last`: record `observe` only for the last step of each chunk (observations are
        then one pytree per chunk, without a step axis): e.g. the potential energy for a log,
        without an extra energy evaluation every step.
    - `box_fn`: `box_fn(state) -> box` for variable-cell runs (e.g. `simulate.npt_box`).
    - `callback`: called as `callback(steps_done, state, observations)` after each chunk.

    **Returns:**

    `(state, neighbors, observations)`: final state and list, and the list of per-chunk
    stacked observations (empty when `observe` is None).

    **Raises:**

    `FloatingPointError` (non-finite positions), `RuntimeError` (the list kept overflowing).
    """
    if num_steps < 0 or steps_per_chunk < 1:
        raise ValueError(f"need num_steps >= 0 and steps_per_chunk >= 1, got {num_steps}, {steps_per_chunk}.")
    observations, done, reallocations = [], 0, 0
    while done < num_steps:
        length = min(steps_per_chunk, num_steps - done)
        new_state, new_nbrs, outs = _run_chunk(
            step_fn, neighbor_fn, observe, box_fn, state, neighbors, steps_per_chunk, jnp.asarray(length),
            observe_last,
        )  # fmt: skip
        if bool(new_nbrs.did_buffer_overflow):
            reallocations += 1
            if reallocations > MAX_REALLOCATIONS:
                raise RuntimeError(
                    f"the neighbour list overflowed {MAX_REALLOCATIONS} times in a row between steps {done} and "
                    f"{done + length}: the density or the cell changes too fast (reduce the timestep or the "
                    "barostat coupling, or allocate with more capacity via capacity_multiplier)."
                )
            # Size the list where it overflowed (the cell there may need more images), then
            # bring it up to date at the chunk's start, where the rerun begins.
            new_box, box = (None, None) if box_fn is None else (box_fn(new_state), box_fn(state))
            neighbors = _reallocate(neighbor_fn, neighbors, new_nbrs, new_state.position, new_box, state.position, box)
            continue
        reallocations = 0
        if not bool(jnp.all(jnp.isfinite(new_state.position))):
            raise FloatingPointError(
                f"positions became NaN/inf between steps {done} and {done + length}; reduce the "
                "timestep or check the starting structure (overlapping atoms?)"
                + (
                    ". With devices=, the energy is also NaN when an atom has more than max_neighbors "
                    "neighbours within the cutoff (a multi-device program cannot raise that error itself)."
                    if isinstance(neighbors, ShardedNeighborList)
                    else "."
                )
            )
        if outs is not None:
            if observe_last:
                outs = jax.tree.map(lambda x, last=length - 1: x[last], outs)
            elif length < steps_per_chunk:
                outs = jax.tree.map(lambda x, n=length: x[:n], outs)
        state, neighbors, done = new_state, new_nbrs, done + length
        if observe is not None:
            observations.append(outs)
        if callback is not None:
            callback(done, state, outs)
    return state, neighbors, observations


def _reallocate(
    neighbor_fn: "UMANeighborFn | ShardedNeighborFn",
    neighbors: NeighborList | ShardedNeighborList,
    overflowed: NeighborList | ShardedNeighborList,
    positions: Float[Array, "atoms 3"],
    box: Array | None,
    start_positions: Float[Array, "atoms 3"],
    start_box: Array | None,
) -> NeighborList | ShardedNeighborList:
    """`run`'s larger list: sized at `positions` (and `box`), where `overflowed` (grown from
    `neighbors`) overflowed, then brought up to date at the chunk's start."""
    if isinstance(neighbor_fn, ShardedNeighborFn) and isinstance(overflowed, ShardedNeighborList):
        grown = neighbor_fn.reallocate(positions, overflowed, box)  # grows every capacity it met
        return neighbor_fn.update(start_positions, grown, start_box)
    if isinstance(neighbor_fn, UMANeighborFn) and isinstance(neighbors, NeighborList):
        extra = max(math.ceil(neighbors.capacity * (neighbor_fn.fns.capacity_multiplier - 1.0)), 16)
        grown = neighbor_fn.allocate(positions, box, extra_capacity=extra)
        return neighbor_fn.update(start_positions, grown, start_box)
    raise ValueError(
        f"neighbors is a {type(neighbors).__name__} but neighbor_fn a {type(neighbor_fn).__name__}: pass the "
        "list that this neighbor_fn.allocate made"
    )
