"""`run_md_batch`: molecular dynamics of many independent systems in one compiled step.

Each system occupies one slot of a stack of padded graphs (a fixed set of systems per run;
[`uma_eqx.relax_batch`][], whose batch changes, packs its structures into one graph instead);
all slots advance together (`jax.vmap`, split over devices), with each slot's neighbour
candidates rebuilt on the host when its atoms have moved too far for the Verlet skin.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, UInt

from ._graph import AtomicGraph, bucket_size
from ._potential import UMA
from ._predict import _relabel, _structures, _task_of
from ._settings import DEFAULT_SETTINGS, ExecutionSettings
from .neighbors._jax import DEFAULT_CAPACITY_MULTIPLIER, DEFAULT_SKIN
from .parallel._data import BATCH_AXIS, batch_mesh, data_parallel, to_host
from .relax import _candidates, _Entry, _evaluate, _image_range, _place, _StepConfig
from .simulate import MDResult, _Recorder

#: Default Langevin friction in 1/fs: the value of ASE's `Langevin` documentation example
#: (`ase/md/langevin.py`, "friction=0.01 / fs" ~ 0.01 fs⁻¹, typical for atomistic systems).
DEFAULT_FRICTION_PER_FS = 0.01
BATCH_ENSEMBLES = ("nve", "nvt")


class _Batch:
    """One padded slot per structure (graphs and state as stacked numpy arrays), for `run_md_batch`."""

    def __init__(self, num_slots: int, atoms_cap: int, edges_cap: int, dtype, index_dtype):
        self.dtype, self.index_dtype = dtype, index_dtype
        self.num_slots = num_slots
        self.atoms_cap, self.edges_cap = 0, 0
        self.graph: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        self.entries: list[_Entry | None] = [None] * num_slots
        self._allocate(atoms_cap, edges_cap)

    def _allocate(self, atoms_cap: int, edges_cap: int) -> None:
        b, a, e, f, i = self.num_slots, atoms_cap, edges_cap, self.dtype, self.index_dtype
        graph = {
            "positions": np.zeros((b, a, 3), f),
            "atomic_numbers": np.zeros((b, a), i),
            "system_index": np.ones((b, a), i),
            "edge_index": np.full((b, 2, e), a - 1, i),
            "edge_shift": np.zeros((b, e, 3), f),
            "cell": np.broadcast_to(np.eye(3, dtype=f), (b, 2, 3, 3)).copy(),
            "charge": np.zeros((b, 2), i),
            "spin": np.zeros((b, 2), i),
            "dataset_index": np.zeros((b, 2), i),
            "atom_mask": np.zeros((b, a), bool),
            "edge_mask": np.zeros((b, e), bool),
            "system_mask": np.zeros((b, 2), bool),
        }
        eye = np.broadcast_to(np.eye(3, dtype=f), (b, 3, 3)).copy()
        state = {
            "orig_cell": eye.copy(),
            "ref_positions": np.zeros((b, a, 3), f),
            "ref_cell": eye.copy(),
            "image_range": np.zeros((b, 3), f),
        }
        if self.graph:  # grow: copy the old contents into the larger arrays
            old_a, old_e = self.atoms_cap, self.edges_cap
            for name, old in self.graph.items():
                if name == "edge_index":
                    graph[name][:, :, :old_e] = np.where(old == old_a - 1, a - 1, old)
                elif name in ("edge_shift", "edge_mask"):
                    graph[name][:, :old_e] = old
                elif name in ("cell", "charge", "spin", "dataset_index", "system_mask"):
                    graph[name][:] = old
                else:
                    graph[name][:, :old_a] = old
            for name, old in self.state.items():
                if name == "ref_positions":
                    state[name][:, :old_a] = old
                else:
                    state[name][:] = old
        self.graph, self.state = graph, state
        self.atoms_cap, self.edges_cap = atoms_cap, edges_cap

    def fit(self, natoms: int, nedges: int) -> bool:
        """Grow (bucketed, grow-only) so that a slot holds `natoms` atoms and `nedges` candidates; True if grown."""
        need_a = max(self.atoms_cap, bucket_size(natoms + 1))  # +1: a padded atom for padded edges
        need_e = self.edges_cap
        if nedges > self.edges_cap:
            need_e = bucket_size(math.ceil(nedges * DEFAULT_CAPACITY_MULTIPLIER))
        if (need_a, need_e) == (self.atoms_cap, self.edges_cap):
            return False
        self._allocate(need_a, need_e)
        return True

    def set_edges(self, s: int, edges: np.ndarray, shifts: np.ndarray, positions, cell, pbc, radius: float) -> None:
        n_e = edges.shape[1]
        g, st = self.graph, self.state
        g["edge_index"][s] = self.atoms_cap - 1
        g["edge_index"][s, :, :n_e] = edges
        g["edge_shift"][s] = 0.0
        g["edge_shift"][s, :n_e] = shifts
        g["edge_mask"][s] = False
        g["edge_mask"][s, :n_e] = True
        n = positions.shape[0]
        st["ref_positions"][s] = 0.0
        st["ref_positions"][s, :n] = positions
        st["ref_cell"][s] = cell
        st["image_range"][s] = _image_range(cell, pbc, radius)

    def admit(self, s: int, entry: _Entry, template: AtomicGraph, edges) -> None:
        n, g, st = entry.natoms, self.graph, self.state
        positions = np.asarray(entry.atoms.positions, np.float64)
        cell = np.asarray(template.cell[0], np.float64)
        for name in ("positions", "atomic_numbers", "atom_mask"):
            g[name][s] = 0
        g["atomic_numbers"][s, :n] = np.asarray(template.atomic_numbers)
        g["atom_mask"][s, :n] = True
        g["system_index"][s] = 1
        g["system_index"][s, :n] = 0
        g["cell"][s] = np.eye(3)
        g["cell"][s, 0] = cell
        for name in ("charge", "spin", "dataset_index"):
            g[name][s] = 0
            g[name][s, 0] = np.asarray(getattr(template, name))[0]
        g["system_mask"][s] = (True, False)
        st["orig_cell"][s] = cell
        self.entries[s] = entry
        self.set_edges(s, edges[0], edges[1], positions, cell, entry.pbc, edges[2])

    def vacate(self, s: int) -> None:
        """Mark slot `s` empty: its graph becomes padding only (zero energy), its state inactive."""
        g = self.graph
        g["atom_mask"][s] = False
        g["atomic_numbers"][s] = 0
        g["system_index"][s] = 1
        g["edge_mask"][s] = False
        g["edge_index"][s] = self.atoms_cap - 1
        g["system_mask"][s] = False
        self.entries[s] = None


class _MDState(eqx.Module):
    """One slot's dynamical state (ASE's `atoms` positions and momenta, and the last forces)."""

    positions: Float[Array, "*batch atoms 3"]
    momenta: Float[Array, "*batch atoms 3"]
    forces: Float[Array, "*batch atoms 3"]
    masses: Float[Array, "*batch atoms"]
    energy: Float[Array, "*batch"]
    key: UInt[Array, "*batch 2"]
    ref_positions: Float[Array, "*batch atoms 3"]
    image_range: Float[Array, "*batch 3"]
    cell: Float[Array, "*batch 3 3"]


class _Integrator(eqx.Module):
    """ASE's `Langevin` coefficients (`updatevars`, per atom through `masses`) and the timestep.

    `langevin = False` is velocity Verlet (ASE's `VelocityVerlet`); `dt = 0` evaluates the
    forces at the start without moving.
    """

    dt: Float[Array, ""]
    kT: Float[Array, ""]
    friction: Float[Array, ""]
    langevin: Bool[Array, ""]


def _md_step(shared: tuple[UMA, _Integrator], item: tuple[AtomicGraph, _MDState], config: _StepConfig):
    (model, integ), (graph, st) = shared, item
    real = graph.atom_mask[:, None]
    m = st.masses[:, None]
    dt, fr = integ.dt, integ.friction
    # ASE Langevin.updatevars
    sigma = jnp.sqrt(2.0 * integ.kT * fr / m)
    c1 = dt / 2.0 - jnp.where(integ.langevin, dt * dt * fr / 8.0, 0.0)
    c2 = jnp.where(integ.langevin, dt * fr / 2.0 - dt * dt * fr * fr / 8.0, 0.0)
    c3 = jnp.where(integ.langevin, jnp.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0, 0.0)
    c5 = jnp.where(integ.langevin, dt**1.5 * sigma / (2.0 * math.sqrt(3.0)), 0.0)
    c4 = fr / 2.0 * c5
    key, k_xi, k_eta = jax.random.split(st.key, 3)
    xi = jnp.where(real, jax.random.normal(k_xi, st.positions.shape, st.positions.dtype), 0.0)
    eta = jnp.where(real, jax.random.normal(k_eta, st.positions.shape, st.positions.dtype), 0.0)
    rnd_pos = c5 * eta
    rnd_vel = c3 * xi - c4 * eta
    v = st.momenta / m
    v = v + c1 * st.forces / m - c2 * v + rnd_vel
    x = st.positions
    x_new = jnp.where(real, x + dt * v + rnd_pos, 0.0)
    safe_dt = jnp.where(dt > 0, dt, 1.0)
    v = jnp.where(integ.langevin, (x_new - x - rnd_pos) / safe_dt, v)
    out, over_atoms = _evaluate(model, graph, x_new, graph.cell.at[0].set(st.cell), config)
    over_cap = jnp.any(over_atoms)
    forces = out["forces"]
    v = v + c1 * forces / m - c2 * v + rnd_vel
    momenta = jnp.where(real, v * m, 0.0)
    new = dataclasses.replace(st, positions=x_new, momenta=momenta, forces=forces, energy=out["energy"][0], key=key)
    moved = jnp.max(jnp.where(graph.atom_mask, jnp.linalg.norm(x_new - st.ref_positions, axis=-1), 0.0))
    stale = 2.0 * moved > config.skin
    ekin = jnp.sum(jnp.where(real, momenta**2 / (2.0 * m), 0.0))
    finite = jnp.isfinite(out["energy"][0]) & jnp.all(jnp.isfinite(forces))
    return new, (stale, over_cap, finite, ekin)


@eqx.filter_jit
def _step(model: UMA, integ: _Integrator, graphs: AtomicGraph, states: _MDState, config: _StepConfig, mesh: Mesh):
    def one(shared, item):
        return _md_step(shared, item, config)

    return data_parallel(one, mesh)((model, integ), (graphs, states))


def run_md_batch(
    model: UMA,
    structures: "str | os.PathLike | ase.Atoms | Iterable[ase.Atoms]",
    task_name: str | Sequence[str | None] | None = None,
    *,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    interval: int = 10,
    friction_per_fs: float = DEFAULT_FRICTION_PER_FS,
    seed: int = 0,
    batch_size: int = 32,
    settings: ExecutionSettings | None = None,
    devices: int | Sequence[Any] | None = None,
    skin: float = DEFAULT_SKIN,
    callback: Callable[[int, int, dict], None] | None = None,
) -> list[MDResult]:
    """Molecular dynamics of many independent systems (replicas or different structures) at once.

    Structure `k` starts from Maxwell–Boltzmann momenta at `temperature_K` drawn with
    `numpy.random.default_rng(seed + k)` (zero total momentum), exactly as
    [`uma_eqx.simulate.run_md`][] with `seed=seed + k` does, so a batched run and one-by-one
    runs start alike. Integrators: `nve`, ASE's `VelocityVerlet`; `nvt`, ASE's `Langevin`
    (its update and coefficients, with `fixcm=False`: ASE deprecates `fixcm=True` since 3.28,
    as it does not sample NVT exactly; the centre of mass diffuses) with `friction_per_fs`, noise drawn with
    `jax.random` (key `seed + k`). Up to `batch_size` systems run in one compiled step; more
    run in successive batches.

    **Arguments:**

    - `model`, `structures`, `task_name`: as for [`uma_eqx.relax_batch`][].
    - `ensemble`: `nve` or `nvt` (Langevin).
    - `temperature_K`, `timestep_fs`, `steps`: the run.
    - `interval`: record a frame and a log row every `interval` steps (and the last step).
    - `friction_per_fs`: Langevin friction in 1/fs.
    - `seed`: base seed of momenta and noise.
    - `batch_size`, `settings`, `devices`, `skin`: as for [`uma_eqx.relax_batch`][].
    - `callback`: `callback(k, step, last_log_row)` after each recorded step of structure `k`.

    **Returns:**

    One [`uma_eqx.simulate.MDResult`][] per structure, in input order.

    **Raises:**

    `ValueError` naming the structure for anything [`uma_eqx.AtomicGraph.for_model`][]
    refuses, and for bad run parameters; `FloatingPointError` if an energy becomes non-finite.
    """
    if ensemble not in BATCH_ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r} for a batched run: use one of {', '.join(BATCH_ENSEMBLES)}")
    for name, value in (("timestep_fs", timestep_fs), ("temperature_K", temperature_K)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if timestep_fs == 0 or steps < 1 or interval < 1:
        raise ValueError(f"need timestep_fs > 0, steps >= 1 and interval >= 1 (got {timestep_fs}, {steps}, {interval})")
    if not (math.isfinite(friction_per_fs) and friction_per_fs >= 0):
        raise ValueError(f"friction_per_fs must be a finite number >= 0, got {friction_per_fs}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    settings = DEFAULT_SETTINGS if settings is None else settings
    cfg = model.config
    mesh = batch_mesh(devices)
    num_slots = -(-batch_size // mesh.size) * mesh.size
    config = _StepConfig(False, float(cfg.cutoff), float(skin), cfg.max_neighbors, settings)
    dtype = np.dtype(model.dtype)
    integ = _Integrator(
        dt=jnp.asarray(timestep_fs * units.fs, dtype),
        kT=jnp.asarray(temperature_K * units.kB, dtype),
        friction=jnp.asarray(friction_per_fs / units.fs, dtype),
        langevin=jnp.asarray(ensemble == "nvt"),
    )
    prepared = []
    for k, atoms in enumerate(_structures(structures)):
        if not isinstance(atoms, ase.Atoms):
            raise ValueError(f"structure #{k} is a {type(atoms).__name__}, not an ase.Atoms.")
        task = _task_of(cfg, atoms, task_name, k)
        try:
            template = AtomicGraph.for_model(model, atoms, task)
        except ValueError as e:
            raise ValueError(_relabel(str(e), k)) from None
        prepared.append((k, atoms, task, template))
    # no more slots than systems (rounded up to a multiple of the device count)
    num_slots = min(num_slots, -(-max(len(prepared), 1) // mesh.size) * mesh.size)
    results: list[MDResult] = []
    for start in range(0, len(prepared), num_slots):
        results += _run_batch(model, prepared[start : start + num_slots], num_slots, mesh, config, integ, dtype,
                              temperature_K, timestep_fs, steps, interval, seed, skin, callback)  # fmt: skip
    return results


def _run_batch(model, chunk, num_slots, mesh, config, integ, dtype, temperature_K, timestep_fs, steps, interval,
               seed, skin, callback) -> list[MDResult]:  # fmt: skip
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    radius = config.cutoff + skin
    index_dtype = np.dtype(jnp.zeros((), int).dtype)
    batch = _Batch(num_slots, 1, 1, dtype, index_dtype)
    edges_of, recorders, starts = [], [], []
    for _, atoms, _, template in chunk:
        pbc = np.array(atoms.pbc, dtype=bool)
        edges = _candidates(np.asarray(atoms.positions, np.float64), np.asarray(template.cell[0]), pbc, radius)
        batch.fit(len(atoms), edges[0].shape[1])
        edges_of.append(edges)
    a_cap = batch.atoms_cap
    positions = np.zeros((num_slots, a_cap, 3), dtype)
    momenta = np.zeros((num_slots, a_cap, 3), dtype)
    masses = np.ones((num_slots, a_cap), dtype)
    keys = np.zeros((num_slots, 2), np.uint32)
    for s, ((k, atoms, task, template), edges) in enumerate(zip(chunk, edges_of)):
        entry = _Entry(index=k, atoms=atoms, task=task, natoms=len(atoms), pbc=np.array(atoms.pbc, dtype=bool))
        batch.admit(s, entry, template, (edges[0], edges[1], radius))
        start = atoms.copy()
        thermalize_momenta(start, temperature_K=temperature_K, rng=np.random.default_rng(seed + k))
        Stationary(start)
        n = len(atoms)
        positions[s, :n] = atoms.positions
        momenta[s, :n] = start.get_momenta()
        masses[s, :n] = atoms.get_masses()
        keys[s] = np.asarray(jax.random.key_data(jax.random.key(seed + k)), np.uint32)
        recorders.append(_Recorder(start, timestep_fs, None, warmup_records=1))
        starts.append(start)
    for s in range(len(chunk), num_slots):
        batch.vacate(s)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    st = batch.state
    host_state = {
        "positions": positions,
        "momenta": momenta,
        "forces": np.zeros_like(positions),
        "masses": masses,
        "energy": np.zeros(num_slots, dtype),
        "key": keys,
        "ref_positions": st["ref_positions"].copy(),
        "image_range": st["image_range"].copy(),
        "cell": st["orig_cell"].copy(),
    }
    graphs = AtomicGraph(**_place(batch.graph, sharding))
    state = _MDState(**_place(host_state, sharding))
    # forces at the start: the same program with dt = 0 and no thermostat
    start_integ = dataclasses.replace(integ, dt=jnp.zeros_like(integ.dt), langevin=jnp.asarray(False))
    state, _ = _step(model, start_integ, graphs, state, config, mesh)

    def record(step: int) -> None:
        host = to_host(state)
        for s, (k, atoms, _, _) in enumerate(chunk):
            n = len(atoms)
            energy = float(host.energy[s])
            if not math.isfinite(energy):
                raise FloatingPointError(f"structure #{k}: energy became NaN/inf by step {step}; reduce the timestep")
            ekin = float(np.sum(host.momenta[s, :n] ** 2 / (2.0 * host.masses[s, :n, None])))
            recorders[s](step, host.positions[s, :n], host.momenta[s, :n], host.cell[s], energy, ekin)
            if callback is not None:
                callback(k, step, recorders[s].log[-1])

    record(0)
    for step in range(1, steps + 1):
        state, (stale, over_cap, finite, _) = _step(model, integ, graphs, state, config, mesh)
        stale, over_cap, finite = (np.asarray(x) for x in to_host((stale, over_cap, finite)))
        bad = np.flatnonzero((over_cap | ~finite)[: len(chunk)])
        if bad.size:
            k = chunk[int(bad[0])][0]
            why = "an energy or force became NaN/inf" if not finite[bad[0]] else "an atom exceeded max_neighbors"
            raise FloatingPointError(f"structure #{k}: {why} at step {step}; reduce the timestep")
        if stale[: len(chunk)].any():
            host = to_host(state)
            ref = np.array(host.ref_positions)
            for s in np.flatnonzero(stale[: len(chunk)]).tolist():
                k, atoms, _, _ = chunk[s]
                n = len(atoms)
                pos = np.asarray(host.positions[s, :n], np.float64)
                cell = np.asarray(host.cell[s], np.float64)
                edges, shifts = _candidates(pos, cell, np.array(atoms.pbc, dtype=bool), radius)
                batch.fit(n, edges.shape[1])  # may add edge slots (one new compilation), never atoms
                batch.set_edges(s, edges, shifts, pos, cell, np.array(atoms.pbc, dtype=bool), radius)
                ref[s] = batch.state["ref_positions"][s]
            graphs = AtomicGraph(**_place(batch.graph, sharding))
            state = dataclasses.replace(state, ref_positions=jax.device_put(ref, sharding))
        if step % interval == 0 or step == steps:
            record(step)
    return [r.result() for r in recorders]


__all__ = ["run_md_batch"]
