"""Losses and metrics on energy per atom, forces and stress."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float

from .._potential import UMA, energy_forces_stress
from ..parallel._data import data_parallel


class LossWeights(eqx.Module):
    """Weights of the three loss terms (mean squared errors)."""

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0


def error_sums(model: UMA, batch: dict) -> dict[str, Float[Array, ""]]:
    """Sums of squared and absolute errors of one padded batch, and what they are sums over.

    Sums (not means) so that batches split over devices add up to the whole batch's:
    [`combine_errors`][] turns summed sums into means. Padding is masked out.

    **Arguments:**

    - `model`: the model.
    - `batch`: a dict with `graph` (an `AtomicGraph`), the labels `energy (systems,)`,
        `forces (atoms, 3)`, `stress (systems, 3, 3)` and the masks `has_forces (atoms,)`,
        `has_stress (systems,)`.

    **Returns:**

    `energy_sq`, `forces_sq`, `stress_sq`, `energy_abs`, `forces_abs`, `stress_abs` (energy
    per atom in eV/atom, forces eV/Å, stress eV/Å³), and the counts `systems`,
    `force_components`, `stress_components`.
    """
    graph = batch["graph"]
    out = energy_forces_stress(model, graph, stress=True)
    natoms = jnp.maximum(graph.num_atoms_per_system, 1).astype(out["energy"].dtype)
    de = jnp.where(graph.system_mask, (out["energy"] - batch["energy"]) / natoms, 0.0)
    df = jnp.where(batch["has_forces"][:, None], out["forces"] - batch["forces"], 0.0)
    ds = jnp.where(batch["has_stress"][:, None, None], out["stress"] - batch["stress"], 0.0)
    return {
        "energy_sq": jnp.sum(de**2),
        "forces_sq": jnp.sum(df**2),
        "stress_sq": jnp.sum(ds**2),
        "energy_abs": jnp.sum(jnp.abs(de)),
        "forces_abs": jnp.sum(jnp.abs(df)),
        "stress_abs": jnp.sum(jnp.abs(ds)),
        "systems": jnp.sum(graph.system_mask),
        "force_components": jnp.sum(batch["has_forces"]) * 3,
        "stress_components": jnp.sum(batch["has_stress"]) * 9,
    }


def combine_errors(sums: dict[str, Float[Array, ""]]) -> dict[str, Float[Array, ""]]:
    """Mean squared errors and absolute-error sums from [`error_sums`][] (summed over batches).

    **Returns:**

    `energy_mse`, `forces_mse`, `stress_mse` (each count floored at 1), `energy_abs_sum`,
    `forces_abs_sum`, `stress_abs_sum`, `n_systems` and `n_force_components` (floored at 1) and
    `n_stress_components`.
    """
    n_sys = jnp.maximum(sums["systems"], 1)
    n_f = jnp.maximum(sums["force_components"], 1)
    n_s = jnp.maximum(sums["stress_components"], 1)
    return {
        "energy_mse": sums["energy_sq"] / n_sys,
        "forces_mse": sums["forces_sq"] / n_f,
        "stress_mse": sums["stress_sq"] / n_s,
        "energy_abs_sum": sums["energy_abs"],
        "forces_abs_sum": sums["forces_abs"],
        "stress_abs_sum": sums["stress_abs"],
        "n_systems": n_sys,
        "n_force_components": n_f,
        "n_stress_components": sums["stress_components"],
    }


def predictions_and_errors(model: UMA, batch: dict) -> dict[str, Float[Array, ""]]:
    """Squared and absolute errors of one padded batch (padding masked out); see [`combine_errors`][]."""
    return combine_errors(error_sums(model, batch))


def errors_over(model: UMA, batches: dict, mesh: Mesh) -> dict[str, Float[Array, ""]]:
    """[`predictions_and_errors`][] of a stack of batches split over `mesh`, as if they were one batch.

    **Arguments:**

    - `model`: the model (replicated on every device).
    - `batches`: batch dicts stacked along a leading axis ([`uma_eqx.parallel.shard_stack`][]).
    - `mesh`: a 1-D mesh ([`uma_eqx.parallel.batch_mesh`][]).
    """
    per_batch = data_parallel(error_sums, mesh)(model, batches)
    return combine_errors(jax.tree.map(lambda x: jnp.sum(x, axis=0), per_batch))


def _weighted(errs: dict, weights: LossWeights) -> Float[Array, ""]:
    loss = (
        weights.energy * errs["energy_mse"] + weights.forces * errs["forces_mse"] + weights.stress * errs["stress_mse"]
    )
    return eqx.error_if(
        loss, ~jnp.isfinite(loss), "training loss is not finite (NaN/inf): check labels and learning rate"
    )


def loss_fn(model: UMA, batch: dict, weights: LossWeights) -> tuple[Float[Array, ""], dict]:
    """Weighted sum of MSEs of energy per atom (eV/atom), forces (eV/Å) and stress (eV/Å³)."""
    errs = predictions_and_errors(model, batch)
    return _weighted(errs, weights), errs


def loss_over(model: UMA, batches: dict, weights: LossWeights, mesh: Mesh) -> tuple[Float[Array, ""], dict]:
    """[`loss_fn`][] of a stack of batches split over `mesh` (data parallel), as if they were one batch."""
    errs = errors_over(model, batches, mesh)
    return _weighted(errs, weights), errs
