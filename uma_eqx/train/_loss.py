"""Losses and metrics on energy per atom, forces and stress."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._potential import UMA, energy_forces_stress


class LossWeights(eqx.Module):
    """Weights of the three loss terms (mean squared errors)."""

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0


def predictions_and_errors(model: UMA, batch: dict) -> dict[str, Float[Array, ""]]:
    """Squared and absolute errors of one padded batch (padding masked out)."""
    graph = batch["graph"]
    out = energy_forces_stress(model, graph, stress=True)
    natoms = jnp.maximum(graph.num_atoms_per_system, 1).astype(out["energy"].dtype)
    sys_mask = graph.system_mask
    de = jnp.where(sys_mask, (out["energy"] - batch["energy"]) / natoms, 0.0)
    df = jnp.where(batch["has_forces"][:, None], out["forces"] - batch["forces"], 0.0)
    ds = jnp.where(batch["has_stress"][:, None, None], out["stress"] - batch["stress"], 0.0)
    n_sys = jnp.maximum(jnp.sum(sys_mask), 1)
    n_f = jnp.maximum(jnp.sum(batch["has_forces"]) * 3, 1)
    n_s = jnp.maximum(jnp.sum(batch["has_stress"]) * 9, 1)
    return {
        "energy_mse": jnp.sum(de**2) / n_sys,
        "forces_mse": jnp.sum(df**2) / n_f,
        "stress_mse": jnp.sum(ds**2) / n_s,
        "energy_abs_sum": jnp.sum(jnp.abs(de)),
        "forces_abs_sum": jnp.sum(jnp.abs(df)),
        "stress_abs_sum": jnp.sum(jnp.abs(ds)),
        "n_systems": n_sys,
        "n_force_components": n_f,
        "n_stress_components": jnp.sum(batch["has_stress"]) * 9,
    }


def loss_fn(model: UMA, batch: dict, weights: LossWeights) -> tuple[Float[Array, ""], dict]:
    """Weighted sum of MSEs of energy per atom (eV/atom), forces (eV/Å) and stress (eV/Å³)."""
    errs = predictions_and_errors(model, batch)
    loss = (
        weights.energy * errs["energy_mse"] + weights.forces * errs["forces_mse"] + weights.stress * errs["stress_mse"]
    )
    loss = eqx.error_if(
        loss, ~jnp.isfinite(loss), "training loss is not finite (NaN/inf): check labels and learning rate"
    )
    return loss, errs
