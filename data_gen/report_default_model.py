"""Evaluate a trained default model on the held-out EMT test split and install it in the package.

    python data_gen/report_default_model.py runs/default_model/model.eqx runs/emt

Writes `uma_eqx/data/default_model.eqx` and `uma_eqx/data/default_model_report.json`.
"""

import json
import pathlib
import platform
import shutil
import sys

import jax.numpy as jnp
import numpy as np

import uma_eqx
from uma_eqx.train import evaluate, read_dataset
from uma_eqx.train._data import batch_capacity

ROOT = pathlib.Path(__file__).parents[1]


def main(model_path: str, data_dir: str) -> None:
    model = uma_eqx.load(model_path)
    data = pathlib.Path(data_dir)
    report = {
        "model": {
            k: v
            for k, v in json.loads(model.config.to_json()).items()
            if k
            in (
                "sphere_channels",
                "hidden_channels",
                "edge_channels",
                "lmax",
                "mmax",
                "num_layers",
                "num_experts",
                "cutoff",
                "datasets",
                "num_distance_basis",
            )
        }
    }
    for split in ("val", "test"):
        records = read_dataset(data / f"{split}.extxyz")
        padding = batch_capacity(records, model.config, 8)
        metrics = evaluate(model, records, padding, jnp.float32, 8)
        report[split] = {"structures": len(records), "atoms": int(sum(len(r.atoms) for r in records)), **metrics}
        report[split]["energy_per_atom_range_eV"] = [
            float(np.min([r.energy / len(r.atoms) for r in records])),
            float(np.max([r.energy / len(r.atoms) for r in records])),
        ]
    metrics_path = pathlib.Path(model_path).parent / "metrics.json"
    if metrics_path.exists():
        history = json.loads(metrics_path.read_text())
        report["training"] = {
            "epochs": len(history),
            "steps": history[-1]["step"],
            "seconds": round(sum(r["epoch_seconds"] for r in history), 1),
            "final_train_loss": history[-1]["train_loss"],
        }
    report["reference"] = "ASE EMT (ase.calculators.emt), data from data_gen/make_emt_dataset.py (seed 0, size full)"
    report["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip() + ", 2 CPU cores"
    summary = data / "summary.json"
    if summary.exists():
        report["dataset_summary"] = json.loads(summary.read_text()).get("counts", None)
    out = ROOT / "uma_eqx" / "data"
    shutil.copy(model_path, out / "default_model.eqx")
    (out / "default_model_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
