"""High-level simulation drivers behind `uma-eqx md` and `uma-eqx optimize`.

Both take an `ase.Atoms` and a model, and return plain Python data (frames and a log), so they
work the same from the command line, a notebook or a script.
"""

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import ase
import numpy as np
from ase import units

from ._potential import UMA
from .calculator import UMACalculator

#: Thermostat / barostat relaxation times in timesteps (ASE's documentation recommends
#: `tdamp = 100 dt` for Nosé–Hoover chains and `pdamp = 1000 dt` for MTK barostats;
#: `ase/md/nose_hoover_chain.py`). JAX-MD's own defaults are the same
#: (`simulate.nvt_nose_hoover(tau=100 dt)`, `npt_nose_hoover(barostat tau=1000 dt)`).
THERMOSTAT_STEPS = 100
BAROSTAT_STEPS = 1000

ENSEMBLES = ("nve", "nvt", "npt")
ENGINES = ("jax-md", "ase")


@dataclasses.dataclass
class MDResult:
    """What [`uma_eqx.simulate.run_md`][] returns.

    - `frames`: snapshots (`ase.Atoms` with positions, momenta, cell, and `info` holding
      `step`, `time_fs`, `energy`), every `interval` steps, the start and the last step included.
    - `log`: one dict per recorded step: `step`, `time_fs`, `epot`, `ekin`, `etot` (eV),
      `temperature_K`, `volume_A3`.
    - `steps_per_second`: steps per second of wall time after compilation (from the first
      recorded step that follows it to the last recorded step), or `None` when no recorded
      steps follow it (a run shorter than one `interval` past the first compiled stretch):
      never a NaN.
    - `wall_time_s`: seconds from the start of the run to its last recorded step, compilation
      included.
    """

    frames: list
    log: list
    steps_per_second: float | None
    wall_time_s: float = 0.0


#: The start of JAX's warning when a float64 dtype is requested without x64 (see `simulate`).
_JAX_MD_X64_WARNING = "Explicitly requested dtype float64 requested in"


def run_md(
    model: UMA,
    atoms: ase.Atoms,
    *,
    task_name: str,
    ensemble: str = "nvt",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    engine: str = "jax-md",
    interval: int = 10,
    pressure_GPa: float = 0.0,
    seed: int = 0,
    callback: Callable[[int, dict], None] | None = None,
) -> MDResult:
    """Molecular dynamics of `atoms` with `model`, on JAX-MD (whole chunks under `lax.scan`) or ASE.

    Velocities start from a Maxwell–Boltzmann distribution at `temperature_K` (zero total
    momentum). Ensembles: `nve` (velocity Verlet), `nvt` (Nosé–Hoover chain), `npt`
    (isotropic MTK / JAX-MD's Nosé–Hoover NPT; periodic systems only), with relaxation
    times of `THERMOSTAT_STEPS` and `BAROSTAT_STEPS` timesteps.

    **Arguments:**

    - `model`, `atoms`, `task_name`: what to simulate (charge/spin from `atoms.info`).
    - `ensemble`: `nve`, `nvt` or `npt`.
    - `temperature_K`, `timestep_fs`, `steps`, `pressure_GPa`: the run.
    - `engine`: `jax-md` (needs the `md` extra) or `ase` (the [`UMACalculator`][]).
    - `interval`: record a frame and a log row every `interval` steps (and at the last step).
    - `seed`: velocity seed.
    - `callback`: `callback(steps_done, last_log_row)` after every recorded interval.

    **Returns:**

    An [`uma_eqx.simulate.MDResult`][].
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}: use one of {', '.join(ENSEMBLES)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if ensemble == "npt" and not atoms.pbc.all():
        raise ValueError(f"npt needs a periodic system (pbc all True), got pbc={atoms.pbc.tolist()}")
    for name, value in (("timestep_fs", timestep_fs), ("temperature_K", temperature_K)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if ensemble != "nve" and temperature_K == 0:
        raise ValueError(f"{ensemble} needs temperature_K > 0 (the thermostat mass is proportional to kT); use nve")
    if timestep_fs == 0 or steps < 1 or interval < 1:
        raise ValueError(f"need timestep_fs > 0, steps >= 1 and interval >= 1 (got {timestep_fs}, {steps}, {interval})")
    if not np.all(np.isfinite(atoms.positions)):
        raise ValueError("the structure has NaN/inf positions")
    atoms = atoms.copy()
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    run = _run_jax_md if engine == "jax-md" else _run_ase
    with warnings.catch_warnings():
        # JAX-MD's `util.high_precision_sum` asks for float64 sums, which JAX truncates (and warns
        # about) when x64 is off: a float32 run is what was asked for, so the warning is noise here
        warnings.filterwarnings("ignore", message=_JAX_MD_X64_WARNING, category=UserWarning)
        return run(
            model, atoms, task_name, ensemble, temperature_K, timestep_fs, steps, interval, pressure_GPa, callback
        )


class _Recorder:
    """Frames, log rows and the steps/s clock shared by both engines.

    The clock starts at record number `warmup_records` (counting from 0, the start): the first
    record taken after everything the run compiles has compiled (ASE: 0, since the calculator
    compiles in the first force call, before the start is recorded; JAX-MD: 1, after the first
    `lax.scan` chunk).
    """

    def __init__(self, atoms: ase.Atoms, timestep_fs: float, callback, warmup_records: int):
        self.atoms, self.timestep_fs, self.callback = atoms, timestep_fs, callback
        self.warmup_records = warmup_records
        self.frames, self.log = [], []
        self._start = time.perf_counter()
        self._clock: tuple[float, int] | None = None  # (time, step) when the timed stretch starts
        self._last: tuple[float, int] = (self._start, 0)

    def __call__(self, step: int, positions, momenta, cell, epot: float, ekin: float) -> None:
        now = time.perf_counter()
        step, epot, ekin = int(step), float(epot), float(ekin)
        if not math.isfinite(epot + ekin):
            raise FloatingPointError(f"energy became NaN/inf by step {step}; reduce the timestep")
        natoms = len(self.atoms)
        volume = abs(float(np.linalg.det(np.asarray(cell)))) if self.atoms.pbc.all() else float("nan")
        time_fs = float(step * self.timestep_fs)
        row = {
            "step": step,
            "time_fs": time_fs,
            "epot": epot,
            "ekin": ekin,
            "etot": epot + ekin,
            "temperature_K": 2.0 * ekin / (3.0 * natoms * units.kB),
            "volume_A3": volume,
        }
        if len(self.log) == self.warmup_records:
            self._clock = (now, step)
        self._last = (now, step)
        self.log.append(row)
        frame = self.atoms.copy()
        frame.set_cell(cell if self.atoms.pbc.any() else self.atoms.cell)
        frame.positions = np.asarray(positions, np.float64)
        frame.set_momenta(np.asarray(momenta, np.float64))
        frame.info.update(step=step, time_fs=time_fs, energy=epot)
        self.frames.append(frame)
        if self.callback is not None:
            self.callback(step, row)

    @property
    def last_step(self) -> int:
        return self.log[-1]["step"] if self.log else -1

    def result(self) -> MDResult:
        (t_end, s_end), rate = self._last, None
        if self._clock is not None and s_end > self._clock[1] and t_end > self._clock[0]:
            rate = (s_end - self._clock[1]) / (t_end - self._clock[0])
        return MDResult(self.frames, self.log, rate, wall_time_s=t_end - self._start)


def _run_ase(model, atoms, task_name, ensemble, temperature_K, timestep_fs, steps, interval, pressure_GPa, callback):
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    record = _Recorder(atoms, timestep_fs, callback, warmup_records=0)
    atoms.calc = UMACalculator(model, task_name=task_name)
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        dyn = VelocityVerlet(atoms, timestep=dt, logfile=None)
    elif ensemble == "nvt":
        dyn = NoseHooverChainNVT(atoms, dt, temperature_K, tdamp=THERMOSTAT_STEPS * dt, logfile=None)
    else:
        dyn = IsotropicMTKNPT(
            atoms,
            dt,
            temperature_K,
            pressure_GPa * units.GPa,
            tdamp=THERMOSTAT_STEPS * dt,
            pdamp=BAROSTAT_STEPS * dt,
            logfile=None,
        )

    def snapshot():
        record(dyn.nsteps, atoms.positions, atoms.get_momenta(), np.asarray(atoms.cell),
               atoms.get_potential_energy(), atoms.get_kinetic_energy())  # fmt: skip

    dyn.attach(snapshot, interval=interval)
    dyn.run(steps)
    if record.last_step != dyn.nsteps:  # steps not a multiple of interval: record the last step too
        snapshot()
    return record.result()


def _run_jax_md(model, atoms, task_name, ensemble, temperature_K, timestep_fs, steps, interval, pressure_GPa, callback):
    try:
        import jax
        import jax.numpy as jnp
        from jax_md import quantity, simulate, space
    except ImportError as e:
        raise ImportError("engine 'jax-md' needs jax-md: pip install 'uma_eqx[md]' (or use engine 'ase')") from e
    from . import jax_md as ujmd

    record = _Recorder(atoms, timestep_fs, callback, warmup_records=1)
    dtype = model.dtype
    npt = ensemble == "npt"
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model, atoms, task_name=task_name, fractional_coordinates=npt)
    box = jnp.asarray(ujmd.box_from_atoms(atoms), dtype)
    if atoms.pbc.all():
        _, shift_fn = space.periodic_general(box, fractional_coordinates=npt)
    else:
        _, shift_fn = space.free()
    R = jnp.asarray(atoms.get_scaled_positions() if npt else atoms.positions, dtype)
    mass = jnp.asarray(atoms.get_masses(), dtype)[:, None]
    dt = timestep_fs * ujmd.FEMTOSECOND
    kT = temperature_K * ujmd.BOLTZMANN
    nbrs = neighbor_fn.allocate(R)
    apply: Callable[..., Any]  # jax_md types apply_fn as Callable[[T], T]; it takes neighbor= (and box=) keywords
    if ensemble == "nve":
        init, apply = simulate.nve(energy_fn, shift_fn, dt)
    elif ensemble == "nvt":
        init, apply = simulate.nvt_nose_hoover(energy_fn, shift_fn, dt, kT, tau=THERMOSTAT_STEPS * dt)
    else:
        init, apply = simulate.npt_nose_hoover(
            energy_fn,
            shift_fn,
            dt,
            pressure_GPa * units.GPa,
            kT,
            barostat_kwargs={"tau": BAROSTAT_STEPS * dt},
            thermostat_kwargs={"tau": THERMOSTAT_STEPS * dt},
        )
    # Start from the ASE Maxwell-Boltzmann momenta (same seed semantics for both engines).
    momenta = jnp.asarray(atoms.get_momenta(), dtype)
    if npt:
        state = init(jax.random.PRNGKey(0), R, box, mass=mass, momenta=momenta, neighbor=nbrs, kT=kT)
    else:
        state = init(jax.random.PRNGKey(0), R, mass=mass, momenta=momenta, neighbor=nbrs, kT=kT)
    box_fn = simulate.npt_box if npt else None

    def cartesian(s):
        if box_fn is None:
            return s.position, box
        b = box_fn(s)
        return s.position @ b.T, b

    def observe(s, n):
        epot = energy_fn(s.position, neighbor=n, **({"box": box_fn(s)} if box_fn is not None else {}))
        return jnp.stack([epot, quantity.kinetic_energy(momentum=s.momentum, mass=s.mass)])

    def record_state(step, s, epot, ekin):
        positions, b = cartesian(s)
        record(step, positions, s.momentum, np.asarray(b, np.float64).T, float(epot), float(ekin))

    first = np.asarray(jax.jit(observe)(state, nbrs))
    record_state(0, state, first[0], first[1])

    def on_chunk(done, s, outs):
        outs = np.asarray(outs)  # energies of the chunk's last step only (observe_last)
        record_state(done, s, outs[0], outs[1])

    ujmd.run(
        lambda s, n: apply(s, neighbor=n),
        state,
        nbrs,
        neighbor_fn,
        steps,
        steps_per_chunk=interval,
        observe=observe,
        observe_last=True,
        box_fn=box_fn,
        callback=on_chunk,
    )
    return record.result()


def relax(
    model: UMA,
    atoms: ase.Atoms,
    *,
    task_name: str,
    fmax: float = 0.05,
    steps: int = 500,
    cell: bool = False,
    optimizer: str = "fire",
    callback: Callable[[int, ase.Atoms], None] | None = None,
) -> tuple[ase.Atoms, list, bool]:
    """Relax positions (and with `cell=True` the cell, through `FrechetCellFilter`) with ASE.

    **Arguments:**

    - `model`, `atoms`, `task_name`: what to relax.
    - `fmax`: convergence threshold on the largest force (eV/Å; with `cell`, also on the
        filter's cell forces).
    - `steps`: maximum optimizer steps.
    - `cell`: relax the cell too (periodic systems).
    - `optimizer`: `fire` or `bfgs`.
    - `callback`: called as `callback(step, atoms)` after each step.

    **Returns:**

    `(relaxed, trajectory, converged)`: the relaxed copy, the frames (with `energy`,
    `fmax` in `info`), and whether `fmax` was reached.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE

    optimizers = {"fire": FIRE, "bfgs": BFGS}
    if optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {optimizer!r}: use fire or bfgs")
    if cell and not atoms.pbc.all():
        raise ValueError(f"--cell relaxation needs a periodic system, got pbc={atoms.pbc.tolist()}")
    if not (math.isfinite(fmax) and fmax > 0):
        raise ValueError(f"fmax must be a positive number of eV/Å, got {fmax}")
    atoms = atoms.copy()
    atoms.calc = UMACalculator(model, task_name=task_name)
    target = FrechetCellFilter(atoms) if cell else atoms
    opt = optimizers[optimizer](target, logfile=None)
    trajectory = []

    def record():
        frame = atoms.copy()
        frame.info.update(
            step=int(opt.nsteps),
            energy=float(atoms.get_potential_energy()),
            fmax=float(np.linalg.norm(target.get_forces(), axis=1).max()),
        )
        trajectory.append(frame)
        if callback is not None:
            callback(opt.nsteps, frame)

    opt.attach(record, interval=1)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    atoms.calc = None
    return atoms, trajectory, converged
