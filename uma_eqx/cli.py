"""The `uma-eqx` command line."""

import json
import os
import pathlib
import sys

import click

DATA = pathlib.Path(__file__).parent / "data"
EXAMPLES = DATA / "examples.extxyz"


class _Fail(click.ClickException):
    exit_code = 2


def _load_model(path: str | None):
    import uma_eqx

    if path is None:
        click.echo("model: built-in default model (trained on EMT for Cu Ag Au Ni Pd Pt Al; pass --model for UMA)", err=True)
        return uma_eqx.default_model()
    if not os.path.exists(path):
        raise _Fail(f"model file not found: {path} (give a .eqx file, or a fairchem .pt to convert)")
    if path.endswith(".pt"):
        return uma_eqx.load_fairchem_checkpoint(path)
    return uma_eqx.load(path)


def _read_structures(paths):
    from ase.io import read

    out = []
    for p in paths:
        if not os.path.exists(p):
            raise _Fail(f"structure file not found: {p}")
        try:
            out += [(p, i, a) for i, a in enumerate(read(p, ":"))]
        except Exception as e:
            raise _Fail(f"cannot read structures from {p}: {e}") from e
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """UMA interatomic potentials in Equinox (JAX).

    \b
    Examples:
      uma-eqx predict                          # built-in model on bundled structures
      uma-eqx predict POSCAR --task omat --output out.json
      uma-eqx convert uma-s-1p1.pt uma-s-1p1.eqx --verify
      uma-eqx info uma-s-1p1.eqx
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("structures", nargs=-1, type=click.Path())
@click.option("--model", "model_path", default=None, help="A .eqx model (or fairchem .pt); default: built-in model.")
@click.option("--task", default=None, help="Task name (omat, omol, oc20, ...); default: the structure's info['task'] or the model's only task.")
@click.option("--output", default=None, type=click.Path(), help="Write results to .json, .csv or .extxyz.")
def predict(structures, model_path, task, output):
    """Energy, forces and stress of STRUCTURES (any ASE-readable files).

    With no STRUCTURES, predicts the bundled example structures.

    \b
    Example:
      uma-eqx predict relaxed.cif --task omat --output results.json
    """
    import numpy as np
    from tqdm import tqdm

    from uma_eqx.calculator import UMACalculator

    model = _load_model(model_path)
    items = _read_structures(list(structures) or [str(EXAMPLES)])
    rows, frames = [], []
    calcs = {}
    for path, index, atoms in tqdm(items, desc="predict", unit="structure", disable=len(items) < 3):
        name = task or atoms.info.get("task") or (model.config.task_names[0] if len(model.config.task_names) == 1 else None)
        if name is None:
            raise _Fail(f"{path}[{index}]: give --task (this model's tasks: {', '.join(model.config.task_names)})")
        try:
            calc = calcs.setdefault(name, UMACalculator(model, task_name=name))
            atoms.calc = calc
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            stress = atoms.get_stress()
        except ValueError as e:
            raise _Fail(f"{path}[{index}]: {e}") from e
        label = atoms.info.get("name", f"{pathlib.Path(path).name}[{index}]")
        rows.append({"structure": label, "task": name, "natoms": len(atoms), "energy_eV": energy,
                     "energy_per_atom_eV": energy / len(atoms), "max_force_eV_A": float(np.linalg.norm(forces, axis=1).max()),
                     "stress_eV_A3": stress.tolist(), "forces_eV_A": forces.tolist()})
        frames.append(atoms)
    click.echo(f"{'structure':24s} {'task':6s} {'atoms':>5s} {'E (eV)':>14s} {'E/atom':>10s} {'max|F| eV/Å':>12s}  stress (eV/Å³, Voigt)")
    for r in rows:
        s = " ".join(f"{v:+.4f}" for v in r["stress_eV_A3"])
        click.echo(f"{r['structure'][:24]:24s} {r['task']:6s} {r['natoms']:5d} {r['energy_eV']:14.6f} "
                   f"{r['energy_per_atom_eV']:10.5f} {r['max_force_eV_A']:12.5f}  {s}")
    if output:
        _write(output, rows, frames)
        click.echo(f"wrote {output}")


def _write(output, rows, frames):
    if output.endswith(".json"):
        pathlib.Path(output).write_text(json.dumps(rows, indent=1))
    elif output.endswith(".csv"):
        import csv

        with open(output, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["structure", "task", "natoms", "energy_eV", "energy_per_atom_eV", "max_force_eV_A",
                        "sxx", "syy", "szz", "syz", "sxz", "sxy"])
            for r in rows:
                w.writerow([r["structure"], r["task"], r["natoms"], r["energy_eV"], r["energy_per_atom_eV"],
                            r["max_force_eV_A"], *r["stress_eV_A3"]])
    elif output.endswith((".extxyz", ".xyz")):
        from ase.io import write

        write(output, frames, format="extxyz")
    else:
        raise _Fail(f"unknown output format for {output}: use .json, .csv or .extxyz")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Re-check every leaf against the checkpoint.")
def convert(checkpoint, out, dtype, verify):
    """Convert a fairchem CHECKPOINT (.pt) to a torch-free OUT (.eqx).

    \b
    Example:
      uma-eqx convert uma-s-1p1.pt uma-s-1p1.eqx --verify
    """
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import uma_eqx
    from uma_eqx.convert import load_pytorch_checkpoint, verify_weight_loading

    if not os.path.exists(checkpoint):
        raise _Fail(f"checkpoint not found: {checkpoint}")
    try:
        model = uma_eqx.load_fairchem_checkpoint(checkpoint, getattr(jnp, dtype), verify=False)
    except (ValueError, ImportError) as e:
        raise _Fail(str(e)) from e
    _print_info(model)
    if verify:
        report = verify_weight_loading(model, load_pytorch_checkpoint(checkpoint))
        click.echo(f"verification: {len(report.rows)} tensors compared exactly; unused keys: "
                   f"{report.unused_keys or 'none'}; derived buffers skipped: {report.derived_keys} -> "
                   f"{'OK' if report.ok else 'FAILED'}")
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
    expert = sum(int(np.prod(x.weights.shape)) for x in jax.tree.leaves(model.backbone.blocks, is_leaf=lambda v: isinstance(v, uma_eqx.MoLELinear)) if isinstance(x, uma_eqx.MoLELinear))
    active = total - expert + (expert // cfg.num_experts if cfg.num_experts else 0)
    click.echo(f"model: lmax={cfg.lmax} mmax={cfg.mmax} layers={cfg.num_layers} channels={cfg.sphere_channels}/"
               f"{cfg.hidden_channels}/{cfg.edge_channels} experts={cfg.num_experts} cutoff={cfg.cutoff} Å "
               f"norm={cfg.norm_type} ff={cfg.ff_type} dtype={model.dtype}")
    click.echo(f"tasks: {', '.join(cfg.task_names)}")
    click.echo(f"parameters: {total:,} total, {active:,} active per structure" + (" (merged)" if model.is_merged else ""))


@main.command()
@click.argument("model_path", required=False, type=click.Path())
def info(model_path):
    """Config, tasks, parameter counts and file format of MODEL (default: built-in model)."""
    import uma_eqx

    model = _load_model(model_path)
    _print_info(model)
    if model_path and model_path.endswith(".eqx"):
        header = uma_eqx.read_header(model_path)
        click.echo(f"file: {model_path} ({os.path.getsize(model_path) / 1e6:.2f} MB), format version {header['format_version']}")


@main.command()
@click.argument("config", type=click.Path())
@click.option("--no-resume", is_flag=True, help="Start from scratch even if out_dir has a checkpoint.")
def train(config, no_resume):
    """Train or fine-tune a model from a TOML CONFIG (see uma_eqx.train.TrainConfig).

    \b
    Example:
      uma-eqx train data_gen/default_model.toml
    """
    from uma_eqx.train import TrainConfig, train as run_training

    if not os.path.exists(config):
        raise _Fail(f"training config not found: {config}")
    try:
        cfg = TrainConfig.from_toml(config)
        model, result = run_training(cfg, resume=not no_resume)
    except (ValueError, FileNotFoundError) as e:
        raise _Fail(str(e)) from e
    last = result["history"][-1] if result["history"] else {}
    click.echo(json.dumps(last, indent=1))
    click.echo(f"wrote {cfg.out_dir}/model.eqx, metrics.csv, metrics.json, learning_curve.png")


if __name__ == "__main__":
    sys.exit(main())
