"""Output heads: per-dataset energy heads and the direct-force head."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._config import UMAConfig
from .nn import Linear, MoLELinear, MoLERouting, SO3Linear


class AbstractEnergyHead(eqx.Module):
    """Maps node features to one energy per atom (before normalisation)."""

    @abc.abstractmethod
    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        ...


class MLPEnergyHead(AbstractEnergyHead):
    """`Linear(C,H) -> SiLU -> Linear(H,H) -> SiLU -> Linear(H,1)` on the `l = 0` features.

    Port of `fairchem.core.models.uma.escn_md.MLP_EFS_Head.energy_block`. Inside fairchem's
    `DatasetSpecificMoEWrapper` every linear is a MoLE layer with one expert per head and
    one-hot coefficients: each system uses the weights of its dataset's head.
    """

    layers: tuple[Linear | MoLELinear, Linear | MoLELinear, Linear | MoLELinear]

    def __init__(self, config: UMAConfig, num_heads: int, dtype=None, *, key):
        keys = jax.random.split(key, 3)
        c, h = config.sphere_channels, config.hidden_channels
        dims = [(c, h), (h, h), (h, 1)]
        self.layers = tuple(
            MoLELinear(num_heads, i, o, True, dtype, key=k) if num_heads > 0 else Linear(i, o, True, dtype, key=k)
            for (i, o), k in zip(dims, keys)
        )

    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        h = jax.nn.silu(self.layers[0](node_features[:, 0, :], routing))
        h = jax.nn.silu(self.layers[1](h, routing))
        return self.layers[2](h, routing)[:, 0]


class LinearEnergyHead(AbstractEnergyHead):
    """`Linear(C, 1)` on the `l = 0` features (`escn_md.py:Linear_Energy_Head`)."""

    layer: Linear | MoLELinear

    def __init__(self, config: UMAConfig, num_heads: int, dtype=None, *, key):
        c = config.sphere_channels
        self.layer = MoLELinear(num_heads, c, 1, True, dtype, key=key) if num_heads > 0 else Linear(c, 1, True, dtype, key=key)

    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        return self.layer(node_features[:, 0, :], routing)[:, 0]


class LinearForceHead(eqx.Module):
    """Direct (non-conservative) forces from the `l = 1` features (`escn_md.py:Linear_Force_Head`).

    `SO3Linear(C -> 1, lmax=1)` on degrees 0 and 1; the `l = 1` output in e3nn order
    `(x, y, z)` is the force.
    """

    linear: SO3Linear

    def __init__(self, config: UMAConfig, dtype=None, *, key):
        self.linear = SO3Linear(config.sphere_channels, 1, 1, dtype, key=key)

    def __call__(self, node_features: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms 3"]:
        return self.linear(node_features[:, :4, :])[:, 1:4, 0]


class EnergyReferences(eqx.Module):
    """Per-task normalisation and per-element reference energies (frozen, not trained).

    fairchem's predict unit returns `E = rmsd * sum_i e_i + mean + sum_i ref[Z_i]`
    (`units/mlip_unit/predict.py`, `Normalizer.denorm` and `ElementReferences.undo_refs`).
    Rows follow `config.datasets`.
    """

    energy_mean: Float[Array, " datasets"]
    energy_rmsd: Float[Array, " datasets"]
    element_references: Float[Array, "datasets elements"]

    def __init__(self, num_datasets: int, num_elements: int, dtype=None):
        dtype = jnp.float32 if dtype is None else dtype
        self.energy_mean = jnp.zeros(num_datasets, dtype)
        self.energy_rmsd = jnp.ones(num_datasets, dtype)
        self.element_references = jnp.zeros((num_datasets, num_elements), dtype)

    def __call__(
        self,
        raw_energy: Float[Array, " systems"],
        dataset_index: Int[Array, " systems"],
        atomic_numbers: Int[Array, " atoms"],
        system_index: Int[Array, " atoms"],
        atom_mask,
    ) -> Float[Array, " systems"]:
        mean, rmsd, refs = jax.lax.stop_gradient((self.energy_mean, self.energy_rmsd, self.element_references))
        atom_ref = refs[dataset_index[system_index], atomic_numbers] * atom_mask
        ref_sum = jax.ops.segment_sum(atom_ref.astype(raw_energy.dtype), system_index, num_segments=raw_energy.shape[0])
        return rmsd[dataset_index] * raw_energy + mean[dataset_index] + ref_sum
