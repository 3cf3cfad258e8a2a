"""`relax_batch`: FIRE relaxation of many structures at once, with a full batch and a crash-safe log.

The batch is one *pack* per device: one graph holding several structures as its systems
(their atoms and candidate edges in contiguous rows, as the model requires), plus each
structure's FIRE state; all packs step together in one compiled program (one pack per device,
[`uma_eqx.parallel.data_parallel`][]). FIRE runs per structure (per-system segment sums and
maxima). A structure that converges, runs out of steps or fails leaves its pack, and the next
structures of the input stream take its place as soon as they fit: the packs are laid out
again on the host, with capacities of atoms and edges sized for the mean structure (grow-only,
bucketed), so a swap never recompiles and a small structure costs its own size, not the
largest one's.

Neighbours: each structure holds the candidate pairs within `cutoff + skin` (host radius
graph, vesin) and the program keeps those inside the cutoff at every step, so the model sees
exactly the host graph; a structure's candidates are rebuilt on the host once an atom moved
(or the cell deformed) enough that a new pair could have entered the cutoff.
"""

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import expm, expm_frechet
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ._graph import AtomicGraph, bucket_size
from ._potential import UMA, energy_forces_stress
from ._predict import _relabel, _structures, _task_of
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .neighbors import radius_graph
from .neighbors._jax import DEFAULT_CAPACITY_MULTIPLIER, DEFAULT_SKIN
from .parallel._data import BATCH_AXIS, batch_mesh, data_parallel, to_host

#: Structures read ahead of the batch, in batches (packs are sized for them before the first step).
LOOKAHEAD_BATCHES = 1
#: Output suffixes written as JSON lines (one JSON object per result); anything else is extxyz.
JSON_SUFFIXES = (".json", ".jsonl")
#: Output suffixes written as extended XYZ (ASE's `extxyz` format).
EXTXYZ_SUFFIXES = (".extxyz", ".xyz")


@dataclasses.dataclass(frozen=True)
class FIREParameters:
    """FIRE's parameters, with ASE's defaults (`ase.optimize.FIRE`, ASE 3.29).

    `maxstep` bounds the norm of the whole step of one structure (all atoms, and the cell
    variables when the cell relaxes), as in ASE; `a` is the starting mixing coefficient and
    `astart` the one it is reset to. `downhill_check` rejects a step that raised the energy
    (ASE's option of the same name: back to the previous positions, velocity zeroed, `dt`
    reduced).
    """

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1
    downhill_check: bool = False

    def __post_init__(self):
        for name in ("dt", "maxstep", "dtmax", "finc", "fdec", "astart", "fa", "a"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"FIREParameters.{name} must be a positive number, got {value!r}.")
        if isinstance(self.n_min, bool) or not isinstance(self.n_min, int) or self.n_min < 0:
            raise ValueError(f"FIREParameters.n_min must be an int >= 0, got {self.n_min!r}.")


class _PackState(eqx.Module):
    """FIRE state of one pack: the structures one device relaxes, as the systems of one graph.

    ASE's `FIRE` attributes plus `FrechetCellFilter`'s variables, per atom (rows of the pack's
    graph) or per system. The optimised variables are ASE's filter positions: `x`, the atoms
    in the undeformed cell (`r = x Fᵀ`), and `log_cell = exp_cell_factor · log F`, with `F`
    the deformation gradient from `orig_cell` (`cell = orig_cell Fᵀ`). Without cell
    relaxation `F = 1` and `x = r`. Unused and padding systems are inactive.
    """

    x: Float[Array, "*batch atoms 3"]
    v: Float[Array, "*batch atoms 3"]
    x_last: Float[Array, "*batch atoms 3"]
    ref_positions: Float[Array, "*batch atoms 3"]  # Cartesian positions at the last neighbour build
    log_cell: Float[Array, "*batch systems 3 3"]
    v_cell: Float[Array, "*batch systems 3 3"]
    log_cell_last: Float[Array, "*batch systems 3 3"]
    orig_cell: Float[Array, "*batch systems 3 3"]
    ref_cell: Float[Array, "*batch systems 3 3"]
    dt: Float[Array, "*batch systems"]
    a: Float[Array, "*batch systems"]
    e_last: Float[Array, "*batch systems"]
    exp_cell_factor: Float[Array, "*batch systems"]
    n_pos: Int[Array, "*batch systems"]  # ASE's `Nsteps`: steps since the last reset
    steps: Int[Array, "*batch systems"]  # ASE's `nsteps`: optimizer steps taken
    started: Bool[Array, "*batch systems"]  # ASE's `vel is not None`
    relax_cell: Bool[Array, "*batch systems"]
    active: Bool[Array, "*batch systems"]
    image_range: Float[Array, "*batch systems 3"]  # largest |S_a| of a candidate within cutoff + skin


#: `_PackState` fields with one row per atom (the others have one row per system).
_ATOM_FIELDS = ("x", "v", "x_last", "ref_positions")


class _Report(eqx.Module):
    """What one step reports per system and atom (evaluated at the positions before the step)."""

    energy: Float[Array, "*batch systems"]
    forces: Float[Array, "*batch atoms 3"]
    stress: Float[Array, "*batch systems 3 3"]
    positions: Float[Array, "*batch atoms 3"]
    cell: Float[Array, "*batch systems 3 3"]
    fmax: Float[Array, "*batch systems"]
    converged: Bool[Array, "*batch systems"]
    finished: Bool[Array, "*batch systems"]
    finite: Bool[Array, "*batch systems"]
    over_cap: Bool[Array, "*batch systems"]
    stale: Bool[Array, "*batch systems"]
    steps: Int[Array, "*batch systems"]
    next_positions: Float[Array, "*batch atoms 3"]
    next_cell: Float[Array, "*batch systems 3 3"]


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    """What shapes the step program (static): a new value compiles a new program."""

    downhill_check: bool
    cutoff: float
    skin: float
    max_neighbors: int | None
    settings: ExecutionSettings


class _Knobs(eqx.Module):
    """Run parameters passed as data, so that other values reuse the compiled step."""

    fmax: Float[Array, ""]
    max_steps: Int[Array, ""]
    maxstep: Float[Array, ""]
    dtmax: Float[Array, ""]
    n_min: Int[Array, ""]
    finc: Float[Array, ""]
    fdec: Float[Array, ""]
    astart: Float[Array, ""]
    fa: Float[Array, ""]

    @classmethod
    def of(cls, fmax: float, max_steps: int, fire: FIREParameters, dtype) -> "_Knobs":
        f = functools.partial(jnp.asarray, dtype=dtype)
        return cls(
            fmax=f(fmax),
            max_steps=jnp.asarray(max_steps),
            maxstep=f(fire.maxstep),
            dtmax=f(fire.dtmax),
            n_min=jnp.asarray(fire.n_min),
            finc=f(fire.finc),
            fdec=f(fire.fdec),
            astart=f(fire.astart),
            fa=f(fire.fa),
        )


def _deformation(log_cell: Float[Array, "3 3"], exp_cell_factor: Float[Array, ""], relax_cell: Bool[Array, ""]):
    """The deformation gradient `F = exp(log_cell / exp_cell_factor)` (the identity without cell relaxation)."""
    eye = jnp.eye(3, dtype=log_cell.dtype)
    return jnp.where(relax_cell, expm(log_cell / exp_cell_factor), eye)


def _evaluate(
    model: UMA,
    graph: AtomicGraph,
    positions: Float[Array, "atoms 3"],
    cell: Float[Array, "systems 3 3"],
    config: "_StepConfig",
) -> tuple[dict[str, Array], Bool[Array, " atoms"]]:
    """Energy, forces and stress of a graph's systems at `positions` and `cell`.

    The model sees the candidate pairs that lie inside the cutoff now (fairchem's inclusive
    test, no zero-length edge), so between rebuilds its graph is the host graph.

    **Returns:**

    `(energy_forces_stress output, over_cap)`: `over_cap[i]` is True when atom `i` has more
    than `max_neighbors` neighbours (where fairchem would cap them; its structure is then
    refused).
    """
    source, target = graph.edge_index[0], graph.edge_index[1]
    vectors = (
        positions[source]
        - positions[target]
        + jnp.einsum("ei,eij->ej", graph.edge_shift, cell[graph.system_index[target]])
    )
    d2 = jnp.sum(vectors * vectors, axis=-1)
    edge_mask = graph.edge_mask & (d2 <= config.cutoff**2) & (d2 > 0)
    if config.max_neighbors is None:
        over_cap = jnp.zeros(graph.num_atoms, bool)
    else:
        counts = jax.ops.segment_sum(edge_mask.astype(jnp.int32), target, num_segments=graph.num_atoms)
        over_cap = counts > config.max_neighbors
    g = eqx.tree_at(lambda g: (g.positions, g.cell, g.edge_mask), graph, (positions, cell, edge_mask))
    return energy_forces_stress(model, g, settings=config.settings), over_cap


def _pack_step(
    shared: tuple[UMA, _Knobs], item: tuple[AtomicGraph, _PackState], config: _StepConfig
) -> tuple[_PackState, _Report]:
    """Evaluate one pack, test each structure's convergence, and take one FIRE step (ASE's `irun` loop body).

    Every structure follows its own FIRE (its own `dt`, `a`, step limit and convergence test):
    per-structure sums and maxima are segment reductions over the atoms of its system.
    """
    (model, fire), (graph, st) = shared, item
    system, atom_mask = graph.system_index, graph.atom_mask
    num_systems = graph.num_systems

    def atoms_of(value):  # a per-system value on each atom's row, broadcast over trailing axes
        value = value[system]
        return value.reshape(value.shape + (1,) * (2 - value.ndim)) if value.ndim < 2 else value

    def total(per_atom):  # sum over each system's atoms
        return jax.ops.segment_sum(per_atom, system, num_segments=num_systems)

    def largest(per_atom):  # max over each system's atoms (0 for a system without atoms)
        return jnp.maximum(
            jax.ops.segment_max(jnp.where(atom_mask, per_atom, 0.0), system, num_segments=num_systems), 0.0
        )

    def vdot(p, q):  # ASE's np.vdot over one structure's (natoms + 3, 3) variables, per system
        return total(jnp.sum(p[0] * q[0], -1)) + jnp.sum(p[1] * q[1], (-2, -1))

    deformations = jax.vmap(_deformation)
    deform = deformations(st.log_cell, st.exp_cell_factor, st.relax_cell)
    positions = jnp.where(atom_mask[:, None], jnp.einsum("aij,aj->ai", deform[system], st.x), 0.0)  # x Fᵀ
    cell = jnp.einsum("sij,skj->sik", st.orig_cell, deform)  # orig_cell Fᵀ
    out, over_atoms = _evaluate(model, graph, positions, cell, config)
    energy, forces, sigma = out["energy"], out["forces"], out["stress"]
    over_cap = total(over_atoms.astype(jnp.int32)) > 0
    bad_rows = total((~jnp.all(jnp.isfinite(forces), -1)).astype(jnp.int32))
    finite = jnp.isfinite(energy) & (bad_rows == 0) & jnp.all(jnp.isfinite(sigma), (-2, -1))

    # FrechetCellFilter.get_forces (scalar_pressure 0): atoms' forces in the undeformed frame, and
    # the gradient of the energy with respect to log F (the adjoint of expm's Fréchet derivative)
    volume = jnp.abs(jnp.linalg.det(cell))
    virial = -volume[:, None, None] * 0.5 * (sigma + jnp.swapaxes(sigma, -1, -2))  # ASE reads Voigt stress
    ucf_gradient = virial @ jnp.linalg.inv(jnp.swapaxes(deform, -1, -2))
    log_deform = st.log_cell / st.exp_cell_factor[:, None, None]
    frechet = jax.vmap(lambda l, g: expm_frechet(l.T, g, compute_expm=False))
    cell_force = frechet(log_deform, ucf_gradient) / st.exp_cell_factor[:, None, None]
    g_atoms = jnp.where(atoms_of(st.relax_cell), jnp.einsum("aj,aji->ai", forces, deform[system]), forces)  # f F
    g_cell = jnp.where(st.relax_cell[:, None, None], cell_force, jnp.zeros_like(cell_force))
    fmax = jnp.sqrt(jnp.maximum(largest(jnp.sum(g_atoms**2, -1)), jnp.max(jnp.sum(g_cell**2, -1), -1)))
    converged = fmax < fire.fmax  # ASE's Optimizable.converged: strictly below
    move = st.active & finite & ~over_cap & ~converged & (st.steps < fire.max_steps)

    # FIRE.step, per system
    x, log_cell, e_last = st.x, st.log_cell, st.e_last
    uphill = jnp.zeros(num_systems, bool)
    if config.downhill_check:
        uphill = st.started & (energy > st.e_last)
        x = jnp.where(atoms_of(uphill), st.x_last, st.x)
        log_cell = jnp.where(uphill[:, None, None], st.log_cell_last, st.log_cell)
        e_last = jnp.where(uphill, st.e_last, energy)
    gradient = (g_atoms, g_cell)
    velocity = (st.v, st.v_cell)
    vf = vdot(gradient, velocity)
    grad2 = vdot(gradient, gradient)
    mix = st.started & (vf > 0.0) & ~uphill
    reset = st.started & ~mix
    scale = st.a * jnp.sqrt(vdot(velocity, velocity)) / jnp.sqrt(jnp.where(grad2 > 0, grad2, 1.0))
    grow = mix & (st.n_pos > fire.n_min)
    dt = jnp.where(grow, jnp.minimum(st.dt * fire.finc, fire.dtmax), jnp.where(reset, st.dt * fire.fdec, st.dt))
    a = jnp.where(grow, st.a * fire.fa, jnp.where(reset, fire.astart, st.a))
    n_pos = jnp.where(mix, st.n_pos + 1, jnp.where(reset, 0, st.n_pos))
    per_atom = (atoms_of, lambda value: value[:, None, None])
    v, v_cell = (
        jnp.where(on(mix), (1.0 - on(st.a)) * vel + on(scale) * grad, jnp.where(on(reset), 0.0, vel))
        for on, vel, grad in zip(per_atom, velocity, gradient)
    )
    v, v_cell = v + atoms_of(dt) * g_atoms, v_cell + dt[:, None, None] * g_cell
    dr, dr_cell = atoms_of(dt) * v, dt[:, None, None] * v_cell
    norm = jnp.sqrt(vdot((dr, dr_cell), (dr, dr_cell)))
    shrink = jnp.where(norm > fire.maxstep, fire.maxstep / jnp.where(norm > 0, norm, 1.0), 1.0)
    new = _PackState(
        x=x + atoms_of(shrink) * dr,
        v=v,
        x_last=x,
        ref_positions=st.ref_positions,
        log_cell=log_cell + shrink[:, None, None] * dr_cell,
        v_cell=v_cell,
        log_cell_last=log_cell,
        orig_cell=st.orig_cell,
        ref_cell=st.ref_cell,
        dt=dt,
        a=a,
        e_last=e_last,
        exp_cell_factor=st.exp_cell_factor,
        n_pos=n_pos,
        steps=st.steps + 1,
        started=jnp.ones_like(st.started),
        relax_cell=st.relax_cell,
        active=st.active,
        image_range=st.image_range,
    )

    def keep_moving(name):  # the stepped value for systems that move, the old one for the others
        old = getattr(st, name)
        on = atoms_of(move) if name in _ATOM_FIELDS else move.reshape(move.shape + (1,) * (old.ndim - 1))
        return jnp.where(on, getattr(new, name), old)

    new = _PackState(**{f.name: keep_moving(f.name) for f in dataclasses.fields(_PackState)})

    # Verlet bound: a pair outside cutoff + skin may have come inside the cutoff
    next_deform = deformations(new.log_cell, new.exp_cell_factor, new.relax_cell)
    next_positions = jnp.where(atom_mask[:, None], jnp.einsum("aij,aj->ai", next_deform[system], new.x), 0.0)
    next_cell = jnp.einsum("sij,skj->sik", new.orig_cell, next_deform)
    moved = largest(jnp.linalg.norm(next_positions - st.ref_positions, axis=-1))
    strained = jnp.sum(st.image_range * jnp.linalg.norm(next_cell - st.ref_cell, axis=-1), -1)
    stale = move & (2.0 * moved + strained > config.skin)
    report = _Report(
        energy=energy,
        forces=forces,
        stress=sigma,
        positions=positions,
        cell=cell,
        fmax=fmax,
        converged=converged,
        finished=st.active & ~move,
        finite=finite,
        over_cap=over_cap,
        stale=stale,
        steps=st.steps,
        next_positions=next_positions,
        next_cell=next_cell,
    )
    return new, report


@eqx.filter_jit
def _step(
    model: UMA, knobs: _Knobs, graphs: AtomicGraph, packs: _PackState, config: _StepConfig, mesh: Mesh
) -> tuple[_PackState, _Report]:
    """One step of every pack: one compiled program per pack capacity, config and mesh."""

    def one(shared, item):
        return _pack_step(shared, item, config)

    return data_parallel(one, mesh)((model, knobs), (graphs, packs))


# ---------------------------------------------------------------------------------------------
# host side: the batch as numpy arrays


@dataclasses.dataclass
class _Entry:
    """A structure admitted to the batch: what the host keeps to rebuild neighbours and report."""

    index: int
    atoms: ase.Atoms
    task: str
    natoms: int
    pbc: np.ndarray


def _image_range(cell: np.ndarray, pbc: np.ndarray, radius: float) -> np.ndarray:
    """`ceil(radius / w_a)` along periodic axes (`w_a` the width across lattice plane `a`), else 0."""
    if not pbc.any():
        return np.zeros(3)
    volume = abs(float(np.linalg.det(cell)))
    areas = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=-1)
    return np.where(pbc, np.ceil(radius / (volume / areas)), 0.0)


def _candidates(positions, cell, pbc, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within `radius` (no neighbour cap): `(edge_index (2, E), shifts (E, 3))`."""
    return radius_graph(positions, cell, pbc, radius, max_neighbors=None)


#: Room a pack is sized with over the demand in sight (slots × the mean structure's atoms and
#: candidate edges, at the first admission): mixed sizes leave and enter without growing it.
PACK_HEADROOM = 1.2


@dataclasses.dataclass
class _Member:
    """A structure in a pack: its graph rows and its FIRE state, kept on the host between re-packs."""

    entry: _Entry
    numbers: np.ndarray  # (n,) atomic numbers
    system: tuple[int, int, int]  # charge, spin, dataset index
    edges: np.ndarray  # (2, e) candidate pairs within cutoff + skin (structure-local atom indices)
    shifts: np.ndarray  # (e, 3) their image offsets
    reserve: int  # edge rows the pack holds for it (>= e; grows when a rebuild needs more)
    state: dict[str, np.ndarray]  # _PackState fields: (n, ...) for atom fields, one system's row otherwise


class _Packs:
    """The host side of the batch: one pack (one graph of several systems) per device.

    A pack has `slots` systems for structures plus one padding system, and capacities of
    atoms and edges shared by all packs (grow-only, bucketed: a growth compiles once). A
    structure's atoms and edges occupy contiguous rows (atoms grouped by system, edges
    sorted by target, as the model requires); when structures enter or leave, the packs are
    laid out again on the host, so the capacity is never fragmented.
    """

    def __init__(self, num_packs: int, slots: int, dtype, index_dtype, fire: FIREParameters):
        self.num_packs, self.slots = num_packs, slots
        self.dtype, self.index_dtype, self.fire = dtype, index_dtype, fire
        self.members: list[list[_Member]] = [[] for _ in range(num_packs)]
        self.atoms_cap = self.edges_cap = 0  # 0: not sized yet (see size_for)
        self.offsets: list[list[int]] = [[] for _ in range(num_packs)]  # first atom row of each member

    def __bool__(self) -> bool:
        return any(self.members)

    def used(self, d: int) -> tuple[int, int]:
        """`(atoms, edges)` taken in pack `d` (one atom row is kept for padded edges)."""
        return 1 + sum(m.entry.natoms for m in self.members[d]), sum(m.reserve for m in self.members[d])

    def fits(self, d: int, natoms: int, reserve: int) -> bool:
        atoms, edges = self.used(d)
        return (len(self.members[d]) < self.slots and atoms + natoms <= self.atoms_cap
                and edges + reserve <= self.edges_cap)  # fmt: skip

    def grow(self, atoms: int, edges: int) -> None:
        """Capacities of at least `atoms` and `edges` (bucketed; never smaller than now)."""
        self.atoms_cap = max(self.atoms_cap, bucket_size(atoms))
        self.edges_cap = max(self.edges_cap, bucket_size(edges))

    def size_for(self, demand: Sequence[tuple[int, int]]) -> None:
        """Size the packs for structures of `(natoms, reserved edges)` like these (before the first step)."""
        mean_atoms = sum(n for n, _ in demand) / len(demand)
        mean_edges = sum(e for _, e in demand) / len(demand)
        self.grow(
            max(1 + math.ceil(self.slots * mean_atoms * PACK_HEADROOM), 1 + max(n for n, _ in demand)),
            max(math.ceil(self.slots * mean_edges * PACK_HEADROOM), max(e for _, e in demand)),
        )

    def _idle_system(self) -> dict[str, np.ndarray]:
        """The per-system `_PackState` fields of an unused system (inactive, identity cell)."""
        f, i = self.dtype, self.index_dtype
        zeros33, eye = np.zeros((3, 3), f), np.eye(3, dtype=f)
        return {
            "log_cell": zeros33,
            "v_cell": zeros33.copy(),
            "log_cell_last": zeros33.copy(),
            "orig_cell": eye,
            "ref_cell": eye.copy(),
            "dt": np.asarray(self.fire.dt, f),
            "a": np.asarray(self.fire.a, f),
            "e_last": np.asarray(0.0, f),
            "exp_cell_factor": np.asarray(1.0, f),
            "n_pos": np.asarray(0, i),
            "steps": np.asarray(0, i),
            "started": np.asarray(False),
            "relax_cell": np.asarray(False),
            "active": np.asarray(False),
            "image_range": np.zeros(3, f),
        }

    def new_state(self, entry: _Entry, cell: np.ndarray, relax_cell: bool, exp_cell_factor, radius: float):
        """A structure's FIRE state before its first step: an idle system made active, at rest."""
        n, f = entry.natoms, self.dtype
        positions = np.asarray(entry.atoms.positions, f)
        state = self._idle_system()
        state.update(
            x=positions.copy(),
            v=np.zeros((n, 3), f),
            x_last=positions.copy(),
            ref_positions=positions.copy(),
            orig_cell=np.asarray(cell, f),
            ref_cell=np.asarray(cell, f),
            exp_cell_factor=np.asarray(float(n) if exp_cell_factor is None else exp_cell_factor, f),
            relax_cell=np.asarray(relax_cell),
            active=np.asarray(True),
            image_range=np.asarray(_image_range(np.asarray(cell, np.float64), entry.pbc, radius), f),
        )
        return state

    def pack(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Lay the members out: `(graph, state)` arrays stacked over packs (leading axis)."""
        self.grow(1, 1)  # a run with nothing to relax still lays out valid (empty) packs
        p, a, e, sys_, f, i = (
            self.num_packs,
            self.atoms_cap,
            self.edges_cap,
            self.slots + 1,
            self.dtype,
            self.index_dtype,
        )
        eye = np.broadcast_to(np.eye(3, dtype=f), (p, sys_, 3, 3))
        graph = {
            "positions": np.zeros((p, a, 3), f),  # set from the FIRE variables inside the step
            "atomic_numbers": np.zeros((p, a), i),
            "system_index": np.full((p, a), self.slots, i),  # padding atoms: the last (padding) system
            "edge_index": np.full((p, 2, e), a - 1, i),  # padded edges: self-loops on the last (padding) atom
            "edge_shift": np.zeros((p, e, 3), f),
            "cell": eye.copy(),
            "charge": np.zeros((p, sys_), i),
            "spin": np.zeros((p, sys_), i),
            "dataset_index": np.zeros((p, sys_), i),
            "atom_mask": np.zeros((p, a), bool),
            "edge_mask": np.zeros((p, e), bool),
            "system_mask": np.zeros((p, sys_), bool),
        }
        state = {name: np.zeros((p, a, 3), f) for name in _ATOM_FIELDS}
        for name, idle in self._idle_system().items():
            state[name] = np.broadcast_to(idle, (p, sys_) + idle.shape).copy()
        for d, members in enumerate(self.members):
            self.offsets[d] = []
            atom, edge = 0, 0
            for s, m in enumerate(members):
                n, k = m.entry.natoms, m.edges.shape[1]
                self.offsets[d].append(atom)
                graph["atomic_numbers"][d, atom : atom + n] = m.numbers
                graph["system_index"][d, atom : atom + n] = s
                graph["atom_mask"][d, atom : atom + n] = True
                graph["edge_index"][d, :, edge : edge + k] = m.edges + atom
                graph["edge_shift"][d, edge : edge + k] = m.shifts
                graph["edge_mask"][d, edge : edge + k] = True
                graph["cell"][d, s] = m.state["orig_cell"]
                graph["charge"][d, s], graph["spin"][d, s], graph["dataset_index"][d, s] = m.system
                graph["system_mask"][d, s] = True
                for name, value in m.state.items():
                    if name in _ATOM_FIELDS:
                        state[name][d, atom : atom + n] = value
                    else:
                        state[name][d, s] = value
                atom, edge = atom + n, edge + k
            assert atom < a and edge <= e, (atom, a, edge, e)  # fits() and grow() keep this
        return graph, state

    def unpack(self, state: dict[str, np.ndarray]) -> None:
        """Copy the stepped `state` (as laid out by the last `pack`) back into the members."""
        for d, members in enumerate(self.members):
            for s, (m, atom) in enumerate(zip(members, self.offsets[d])):
                n = m.entry.natoms
                for name in m.state:
                    rows = state[name][d, atom : atom + n] if name in _ATOM_FIELDS else state[name][d, s]
                    m.state[name] = np.array(rows)

    def set_edges(self, m: _Member, edges: np.ndarray, shifts: np.ndarray, positions, cell, radius: float) -> None:
        """New candidate pairs for member `m`, built at `positions` and `cell` (grows the packs if needed)."""
        m.edges, m.shifts = edges, shifts
        if edges.shape[1] > m.reserve:
            m.reserve = math.ceil(edges.shape[1] * DEFAULT_CAPACITY_MULTIPLIER)
            self.grow(0, max(self.used(d)[1] for d in range(self.num_packs)))
        m.state["ref_positions"] = np.asarray(positions, self.dtype)
        m.state["ref_cell"] = np.asarray(cell, self.dtype)
        m.state["image_range"] = np.asarray(_image_range(cell, m.entry.pbc, radius), self.dtype)


def _place(host: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
    return {k: jax.device_put(v, sharding) for k, v in host.items()}


# ---------------------------------------------------------------------------------------------
# results: one record per input index, appended and fsynced as they finish


def _record_atoms(result: dict) -> ase.Atoms:
    """An output frame: the final structure with `energy/forces/stress` and the record's scalars in `info`."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = result["atoms"].copy() if isinstance(result.get("atoms"), ase.Atoms) else ase.Atoms()
    atoms.calc = None
    for key in list(atoms.info):
        if key in _INFO_KEYS:
            del atoms.info[key]
    atoms.info.update({k: result[k] for k in _INFO_KEYS if result.get(k) is not None})
    if "energy" in result:
        stress = np.asarray(result["stress"], np.float64)
        atoms.calc = SinglePointCalculator(
            atoms, energy=result["energy"], forces=np.asarray(result["forces"]), stress=stress
        )
    return atoms


#: Record fields kept in an extxyz frame's `info` (and in every JSON record).
_INFO_KEYS = ("index", "task", "natoms", "steps", "converged", "fmax", "error")


def _json_record(result: dict) -> dict:
    record = {k: result[k] for k in _INFO_KEYS if k in result}
    if "energy" in result:
        record.update(energy=result["energy"], forces=np.asarray(result["forces"]).tolist(),
                      stress=np.asarray(result["stress"]).tolist())  # fmt: skip
    atoms = result.get("atoms")
    if isinstance(atoms, ase.Atoms):
        record["structure"] = {
            "numbers": atoms.numbers.tolist(),
            "positions": atoms.positions.tolist(),
            "cell": np.asarray(atoms.cell).tolist(),
            "pbc": atoms.pbc.tolist(),
        }
    return record


def _from_json(record: dict) -> dict:
    result = dict(record)
    structure = result.pop("structure", None)
    if structure is not None:
        result["atoms"] = ase.Atoms(
            numbers=structure["numbers"], positions=structure["positions"], cell=structure["cell"], pbc=structure["pbc"]
        )
    for key in ("forces", "stress"):
        if key in result:
            result[key] = np.asarray(result[key], np.float64)
    return result


def _from_frame(atoms: ase.Atoms) -> dict:
    result: dict[str, Any] = {k: atoms.info[k] for k in _INFO_KEYS if k in atoms.info}
    result["index"] = int(result["index"])
    if atoms.calc is not None and "energy" in atoms.calc.results:
        result["energy"] = float(atoms.calc.results["energy"])
        result["forces"] = np.asarray(atoms.calc.results["forces"], np.float64)
        from ase.stress import voigt_6_to_full_3x3_stress

        stress = np.asarray(atoms.calc.results["stress"], np.float64)
        result["stress"] = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress
    if "converged" in result:
        result["converged"] = bool(result["converged"])
    frame = atoms.copy()
    frame.calc = None
    for key in _INFO_KEYS:
        frame.info.pop(key, None)
    result["atoms"] = frame
    return result


class ResultLog:
    """An append-only, crash-safe file of results: one record per input index.

    Each record is written whole with one `write`, then flushed and `fsync`ed, so a killed
    run leaves every finished record on disk and at most one torn record at the end, which
    [`ResultLog.open`][uma_eqx.relax.ResultLog.open] cuts off. Formats by suffix: `.json` /
    `.jsonl` (one JSON object per line) or `.extxyz` / `.xyz` (one frame per record; the final
    structure with `energy`, `forces`, `stress` and the record's `index`, `steps`,
    `converged`, `fmax`, `task`, `natoms`, `error` in `info`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        suffix = os.path.splitext(self.path)[1].lower()
        if suffix not in JSON_SUFFIXES + EXTXYZ_SUFFIXES:
            raise ValueError(
                f"output {self.path!r}: unknown suffix {suffix!r}; use one of "
                f"{', '.join(JSON_SUFFIXES + EXTXYZ_SUFFIXES)}."
            )
        self.json = suffix in JSON_SUFFIXES

    def open(self) -> dict[int, dict]:
        """Read the finished records (cutting off a torn last record) and open for appending.

        **Returns:**

        The records already on disk, by input index.
        """
        done: dict[int, dict] = {}
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            good, records = self._parse(data)
            if good < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            for record in records:
                done[int(record["index"])] = record
        self._file = open(self.path, "ab")
        return done

    def _parse(self, data: bytes) -> tuple[int, list[dict]]:
        """`(bytes of complete records, records)`."""
        records, good, pos = [], 0, 0
        if self.json:
            for line in data.splitlines(keepends=True):
                pos += len(line)
                if not line.endswith(b"\n"):
                    break
                try:
                    records.append(_from_json(json.loads(line)))
                except ValueError:
                    break
                good = pos
            return good, records
        import io

        from ase.io import read

        lines = data.splitlines(keepends=True)
        i = 0
        while i < len(lines):
            try:
                n = int(lines[i].strip())
            except ValueError:
                break
            if i + n + 2 > len(lines) or not lines[i + n + 1].endswith(b"\n"):
                break
            chunk = b"".join(lines[i : i + n + 2])
            try:
                frame = read(io.StringIO(chunk.decode()), format="extxyz")
            except Exception:  # noqa: BLE001 - any parse failure marks a torn record
                break
            assert isinstance(frame, ase.Atoms)
            records.append(_from_frame(frame))
            good += len(chunk)
            i += n + 2
        return good, records

    def append(self, result: dict) -> None:
        """Write one record and make it durable (`flush` + `fsync`)."""
        if self.json:
            data = (json.dumps(_json_record(result)) + "\n").encode()
        else:
            import io

            from ase.io import write

            text = io.StringIO()
            write(text, _record_atoms(result), format="extxyz")
            data = text.getvalue().encode()
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self, results: Sequence[dict]) -> None:
        """Rewrite the file with every record in input order (atomically: temporary file, then rename)."""
        self._file.close()
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            self._file = f
            for result in results:
                if self.json:
                    f.write((json.dumps(_json_record(result)) + "\n").encode())
                else:
                    import io

                    from ase.io import write

                    text = io.StringIO()
                    write(text, _record_atoms(result), format="extxyz")
                    f.write(text.getvalue().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---------------------------------------------------------------------------------------------


def relax_batch(
    model: UMA,
    structures: "str | os.PathLike | ase.Atoms | Iterable[ase.Atoms]",
    task_name: str | Sequence[str | None] | None = None,
    *,
    fmax: float = 0.05,
    cell: bool = False,
    max_steps: int = 500,
    batch_size: int = 32,
    output: str | os.PathLike | None = None,
    settings: ExecutionSettings | None = None,
    devices: int | Sequence[Any] | None = None,
    fire: FIREParameters | None = None,
    exp_cell_factor: float | None = None,
    skin: float = DEFAULT_SKIN,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Relax many structures with FIRE, the whole batch in one compiled step.

    The optimizer is ASE's `FIRE` (same parameters, same step, same convergence rule: the
    largest row norm of the optimised forces strictly below `fmax`), applied to the atoms'
    positions and, with `cell=True`, to the cell through ASE's `FrechetCellFilter` (scalar
    pressure 0): the variables are the positions in the undeformed cell, `x = r F⁻ᵀ`, and
    `exp_cell_factor · log F` for the deformation gradient `F` from the starting cell; their
    forces are `f F` and

    $$G = \\frac{1}{c}\\, L_{\\exp}\\big((\\log F)^\\top,\\; -V\\sigma F^{-\\top}\\big),$$

    the gradient of the energy with respect to `log F` (`L_exp` the Fréchet derivative of the
    matrix exponential, `c = exp_cell_factor`, `σ` the stress, `V` the volume). The three
    rows of `G` count in the convergence test, as in ASE.

    Up to `batch_size` structures step together, packed as the systems of one graph per
    device (split over `devices`); a structure leaves the batch when it converges, reaches
    `max_steps` or fails, and the next ones from the stream take its place as soon as their
    atoms and edges fit. Pack capacities (atoms, candidate edges) are sized for the mean
    structure in sight, bucketed, and only grow, so a run compiles a few times at most, never
    per swap, and each structure costs its own size. Each structure's neighbours are pairs within
    `cutoff + skin`, filtered to the cutoff at every step and rebuilt on the host (vesin) when
    the Verlet bound says a new pair may have come inside the cutoff: energies equal the
    one-structure [`uma_eqx.calculator.UMACalculator`][]'s up to round-off (experts are mixed
    per structure rather than merged).

    With `output`, each result is appended to the file as it finishes (`fsync`ed; one record
    per input index, see [`uma_eqx.relax.ResultLog`][]). Run the same call again after a crash
    or a kill: finished indices are read back and skipped, the rest run, and every input ends
    with exactly one record; when all are done the file is rewritten in input order.

    **Arguments:**

    - `model`: the model.
    - `structures`: a list/iterable of `ase.Atoms`, one `ase.Atoms`, or a path to any file
        ASE reads (all frames, streamed).
    - `task_name`: one task for all, one per structure, or `None` (`atoms.info["task"]`, or
        the model's only task).
    - `fmax`: convergence threshold in eV/Å.
    - `cell`: also relax the cell of fully periodic structures (others relax positions only).
    - `max_steps`: FIRE steps at most per structure (ASE's `steps`).
    - `batch_size`: structures stepping together at most (rounded up to a multiple of the device count).
    - `output`: a `.extxyz`/`.xyz` or `.json`/`.jsonl` file written as results finish (and
        read back to resume).
    - `settings`: how to execute the model (see [`uma_eqx.ExecutionSettings`][]).
    - `devices`: devices the batch is split over: `None` for all local devices, a count, or
        a list (see [`uma_eqx.parallel.resolve_devices`][]).
    - `fire`: FIRE's parameters (default ASE's, [`uma_eqx.relax.FIREParameters`][]).
    - `exp_cell_factor`: `FrechetCellFilter`'s scale of the cell variables; default the
        structure's atom count (ASE's default).
    - `skin`: Verlet skin of the candidate pairs in Å.
    - `progress`: show a tqdm progress bar.
    - `callback`: called with each result as it finishes.

    **Returns:**

    One dict per input structure, in input order: `index`, `energy` (eV), `forces` (`(n, 3)`
    eV/Å, Cartesian), `stress` (`(3, 3)` eV/Å³), `steps` (FIRE steps taken), `converged`,
    `fmax` (the convergence measure at the end), `atoms` (the final structure: positions and
    cell; `info` kept), `task`, `natoms`. A structure the model cannot take (unknown element,
    NaN position, overlapping atoms, bad task), or whose energy became non-finite, gets
    `{"index", "error", "natoms", "task", "steps", "converged": False}` (plus its last state
    for a failure during the run) and the others go on. Not converged within `max_steps`:
    `converged=False` with the last state.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}.")
    if not (isinstance(fmax, (int, float)) and math.isfinite(fmax) and fmax > 0):
        raise ValueError(f"fmax must be a positive number of eV/Å, got {fmax!r}.")
    if not (isinstance(skin, (int, float)) and math.isfinite(skin) and skin >= 0):
        raise ValueError(f"skin must be a number of Å >= 0, got {skin!r}.")
    if exp_cell_factor is not None and not (math.isfinite(exp_cell_factor) and exp_cell_factor > 0):
        raise ValueError(f"exp_cell_factor must be a positive number or None, got {exp_cell_factor!r}.")
    fire = FIREParameters() if fire is None else fire
    settings = DEFAULT_SETTINGS if settings is None else settings
    cfg = model.config
    mesh = batch_mesh(devices)
    if isinstance(structures, Sequence) and not isinstance(structures, str):
        batch_size = min(batch_size, max(len(structures), 1))  # no more slots than structures
    slots = -(-batch_size // mesh.size)  # per device
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    radius = cfg.cutoff + skin
    config = _StepConfig(fire.downhill_check, float(cfg.cutoff), float(skin), cfg.max_neighbors, settings)
    dtype = np.dtype(model.dtype)
    knobs = _Knobs.of(fmax, max_steps, fire, dtype)
    index_dtype = np.dtype(jnp.zeros((), int).dtype)

    log = ResultLog(output) if output is not None else None
    results: dict[int, dict] = log.open() if log is not None else {}
    bar = tqdm(desc="relax", unit="structure", disable=not progress)
    packs = _Packs(mesh.size, slots, dtype, index_dtype, fire)

    def emit(result: dict) -> None:
        results[result["index"]] = result
        if log is not None:
            log.append(result)
        if callback is not None:
            callback(result)
        bar.update(1)

    def fail(k: int, atoms, task, message: str, steps: int = 0, last: dict | None = None) -> None:
        natoms = len(atoms) if isinstance(atoms, ase.Atoms) else 0
        row = {"index": k, "error": message, "natoms": natoms, "task": task, "steps": steps, "converged": False}
        if last is not None:
            row.update(last)
        emit(row)

    stream = _Admissions(model, structures, task_name, results, fail, radius, cell)
    pending: collections.deque = collections.deque()
    items = iter(stream)

    def reserve_of(edges) -> int:
        return math.ceil(edges[0].shape[1] * DEFAULT_CAPACITY_MULTIPLIER)

    def fill() -> None:
        """Admit waiting structures, in stream order, while one fits in a pack with a free slot.

        The head of the queue waits (no overtaking) until a pack has room for it; a structure
        larger than an empty pack grows the packs (one compilation).
        """
        while True:
            while len(pending) < (1 + LOOKAHEAD_BATCHES) * packs.slots * packs.num_packs:
                item = next(items, None)
                if item is None:
                    break
                pending.append(item)
            if not pending:
                return
            if not packs.atoms_cap:
                packs.size_for([(item[0].natoms, reserve_of(item[2])) for item in pending])
            entry, template, edges, relax_cell = pending[0]
            reserve = reserve_of(edges)
            room = [d for d in range(packs.num_packs) if packs.fits(d, entry.natoms, reserve)]
            if not room:
                empty = [d for d in range(packs.num_packs) if not packs.members[d]]
                if not empty:
                    return
                packs.grow(1 + entry.natoms, reserve)
                room = empty
            d = max(room, key=lambda d: packs.atoms_cap - packs.used(d)[0])
            pending.popleft()
            state = packs.new_state(entry, np.asarray(template.cell[0]), relax_cell, exp_cell_factor, radius)
            system = tuple(int(np.asarray(getattr(template, name))[0]) for name in ("charge", "spin", "dataset_index"))
            numbers = np.asarray(template.atomic_numbers)[: entry.natoms]
            packs.members[d].append(_Member(entry, numbers, system, edges[0], edges[1], reserve, state))  # pyright: ignore[reportArgumentType]

    try:
        fill()
        host_graph, host_state = packs.pack()
        graphs = AtomicGraph(**_place(host_graph, sharding))
        while packs:
            new, report = _step(model, knobs, graphs, _PackState(**_place(host_state, sharding)), config, mesh)
            finished, stale = (np.asarray(flag) for flag in to_host((report.finished, report.stale)))
            host_new = to_host(new)
            host_state = {f.name: np.array(getattr(host_new, f.name)) for f in dataclasses.fields(_PackState)}
            if not (finished.any() or stale.any()):
                continue
            rep = to_host(report)
            packs.unpack(host_state)
            for d, members in enumerate(packs.members):
                for s, m in enumerate(members):
                    rows = slice(packs.offsets[d][s], packs.offsets[d][s] + m.entry.natoms)
                    if finished[d, s]:
                        emit(_result(m.entry, rep, d, s, rows, cell))
                    elif stale[d, s]:
                        positions = np.asarray(rep.next_positions[d, rows], np.float64)
                        cell_now = np.asarray(rep.next_cell[d, s], np.float64)
                        edges, shifts = _candidates(positions, cell_now, m.entry.pbc, radius)
                        packs.set_edges(m, edges, shifts, positions, cell_now, radius)
                packs.members[d] = [m for s, m in enumerate(members) if not finished[d, s]]
            fill()
            host_graph, host_state = packs.pack()
            graphs = AtomicGraph(**_place(host_graph, sharding))
    finally:
        bar.close()
        if log is not None:
            log.close()
    total = stream.count
    missing = [k for k in range(total) if k not in results]
    if missing:
        raise RuntimeError(f"relax_batch: no result for structures {missing[:10]} (a bug; please report it).")
    ordered = [results[k] for k in range(total)]
    if log is not None:
        log.finish(ordered)
    return ordered


def _result(entry: _Entry, rep: _Report, d: int, s: int, rows: slice, cell: bool) -> dict:
    """The record of the structure that just left system `s` of pack `d` (its atoms at `rows`)."""
    n = entry.natoms
    atoms = entry.atoms.copy()
    atoms.calc = None
    atoms.positions = np.asarray(rep.positions[d, rows], np.float64)
    if cell and atoms.pbc.all():
        atoms.set_cell(np.asarray(rep.cell[d, s], np.float64), scale_atoms=False)
    row: dict[str, Any] = {
        "index": entry.index,
        "task": entry.task,
        "natoms": n,
        "steps": int(rep.steps[d, s]),
        "converged": bool(rep.converged[d, s]),
        "fmax": float(rep.fmax[d, s]),
        "atoms": atoms,
    }
    if not bool(rep.finite[d, s]):
        row["error"] = (
            f"structure #{entry.index}: the energy, forces or stress became non-finite after "
            f"{int(rep.steps[d, s])} steps; check the structure (or relax it with uma_eqx.simulate.relax)"
        )
        row["converged"] = False
        return row
    row.update(
        energy=float(rep.energy[d, s]),
        forces=np.asarray(rep.forces[d, rows], np.float64),
        stress=np.asarray(rep.stress[d, s], np.float64),
    )
    if bool(rep.over_cap[d, s]):
        row["error"] = (
            f"structure #{entry.index}: an atom has more than the model's max_neighbors neighbours within the "
            "cutoff, where fairchem applies its neighbour cap, which the batched graph does not reproduce; relax "
            "it with uma_eqx.simulate.relax"
        )
        row["converged"] = False
    return row


class _Admissions:
    """The input stream as `(entry, template graph, (edges, shifts), relax_cell)` per structure to relax.

    Skips indices in `done` (a resumed run) and reports bad structures through `fail`;
    `count` is the number of structures read so far (all of them once exhausted).
    """

    def __init__(self, model, structures, task_name, done: dict, fail, radius: float, cell: bool):
        self.model, self.task_name, self.done, self.fail = model, task_name, done, fail
        self.radius, self.cell = radius, cell
        self.count = 0
        self._items = self._generate(_structures(structures))

    def __iter__(self):
        return self._items

    def _generate(self, structures: Iterator):
        cfg = self.model.config
        for k, atoms in enumerate(structures):
            self.count = k + 1
            if k in self.done:
                continue
            task = None
            try:
                if not isinstance(atoms, ase.Atoms):
                    raise ValueError(f"structure #{k} is a {type(atoms).__name__}, not an ase.Atoms.")
                task = _task_of(cfg, atoms, self.task_name, k)
                template = AtomicGraph.for_model(self.model, atoms, task)
            except ValueError as e:
                self.fail(k, atoms, task, _relabel(str(e), k))
                continue
            pbc = np.array(atoms.pbc, dtype=bool)
            positions = np.asarray(atoms.positions, np.float64)
            edges = _candidates(positions, np.asarray(template.cell[0], np.float64), pbc, self.radius)
            entry = _Entry(index=k, atoms=atoms, task=task, natoms=len(atoms), pbc=pbc)
            yield entry, template, edges, bool(self.cell and pbc.all())
        task_name = self.task_name
        if task_name is not None and not isinstance(task_name, str) and len(task_name) != self.count:
            raise ValueError(f"task_name has {len(task_name)} entries for {self.count} structures.")


__all__ = ["FIREParameters", "ResultLog", "relax_batch"]
