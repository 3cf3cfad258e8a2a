"""Output heads: per-dataset energy heads and the direct-force head."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .nn import Linear, MoLELinear, MoLERouting, SO3Linear


def _head_linear(num_heads: int, in_features: int, out_features: int, dtype, key) -> Linear | MoLELinear:
    # One linear of a head: plain for a single head, one expert per head otherwise.
    if num_heads < 0:
        raise ValueError(f"num_heads={num_heads} must be >= 0 (0: one plain head; n > 0: n per-dataset heads)")
    if num_heads > 0:
        return MoLELinear(num_heads, in_features, out_features, True, dtype, key=key)
    return Linear(in_features, out_features, True, dtype, key=key)


class AbstractEnergyHead(eqx.Module):
    """Maps node features to one energy per atom (before normalisation and references)."""

    @abc.abstractmethod
    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        """**Arguments:**

        - `node_features`: `(atoms, coeffs, channels)` backbone output; heads read `l = 0`.
        - `routing`: which head each atom's system uses (one-hot coefficients over the heads,
          atoms grouped by system), or `None` for a single plain head.

        **Returns:**

        `(atoms,)` raw per-atom energies.
        """


class MLPEnergyHead(AbstractEnergyHead):
    """A three-layer MLP on the `l = 0` features.

    Port of `fairchem.core.models.uma.escn_md.MLP_EFS_Head.energy_block` (also
    `MLP_Energy_Head`): `e = W_3 silu(W_2 silu(W_1 x_0 + b_1) + b_2) + b_3`, widths
    `sphere_channels -> hidden_channels -> hidden_channels -> 1`. Inside fairchem's
    `DatasetSpecificMoEWrapper` every linear is a MoLE layer with one expert per head and
    one-hot coefficients: each system uses the weights of its dataset's head.
    """

    layers: tuple[Linear | MoLELinear, Linear | MoLELinear, Linear | MoLELinear]

    def __init__(self, sphere_channels: int, hidden_channels: int, num_heads: int, dtype=None, *, key):
        """**Arguments:**

        - `sphere_channels`: width of the node features (`channels`).
        - `hidden_channels`: width of the two hidden layers.
        - `num_heads`: 0 for one head of plain [`uma_eqx.nn.Linear`][] layers; `n > 0` for `n`
          per-dataset heads stored as [`uma_eqx.nn.MoLELinear`][] experts (fairchem allocates
          one per dataset name, `config.num_head_experts`).
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the initialisation (checkpoints overwrite it).
        """
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = (
            _head_linear(num_heads, sphere_channels, hidden_channels, dtype, k1),
            _head_linear(num_heads, hidden_channels, hidden_channels, dtype, k2),
            _head_linear(num_heads, hidden_channels, 1, dtype, k3),
        )

    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        """**Arguments:**

        - `node_features`: `(atoms, coeffs, channels)` backbone output; only `l = 0` is read.
        - `routing`: one-hot head coefficients per system, atoms grouped by system (required
          with `num_heads > 0`); a plain head ignores it (pass `None`).

        **Returns:**

        `(atoms,)` raw per-atom energies.
        """
        h = jax.nn.silu(self.layers[0](node_features[:, 0, :], routing))
        h = jax.nn.silu(self.layers[1](h, routing))
        return self.layers[2](h, routing)[:, 0]


class LinearEnergyHead(AbstractEnergyHead):
    """A linear map of the `l = 0` features.

    Port of `fairchem.core.models.uma.escn_md.Linear_Energy_Head`: `e = W x_0 + b`, widths
    `sphere_channels -> 1`.
    """

    layer: Linear | MoLELinear

    def __init__(self, sphere_channels: int, num_heads: int, dtype=None, *, key):
        """**Arguments:**

        - `sphere_channels`: width of the node features (`channels`).
        - `num_heads`: 0 for one plain [`uma_eqx.nn.Linear`][]; `n > 0` for `n` per-dataset
          heads stored as [`uma_eqx.nn.MoLELinear`][] experts.
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the initialisation (checkpoints overwrite it).
        """
        self.layer = _head_linear(num_heads, sphere_channels, 1, dtype, key)

    def __call__(
        self, node_features: Float[Array, "atoms coeffs channels"], routing: MoLERouting | None
    ) -> Float[Array, " atoms"]:
        """**Arguments:**

        - `node_features`: `(atoms, coeffs, channels)` backbone output; only `l = 0` is read.
        - `routing`: one-hot head coefficients per system, atoms grouped by system (required
          with `num_heads > 0`); a plain head ignores it (pass `None`).

        **Returns:**

        `(atoms,)` raw per-atom energies.
        """
        return self.layer(node_features[:, 0, :], routing)[:, 0]


class LinearForceHead(eqx.Module):
    """Direct (non-conservative) forces from the `l = 0, 1` features.

    Port of `fairchem.core.models.uma.escn_md.Linear_Force_Head`: `SO3Linear(C -> 1, lmax=1)`
    on degrees 0 and 1; the `l = 1` output, in e3nn order `(x, y, z)`, is the force:
    `F = W_1 x_1`.
    """

    linear: SO3Linear

    def __init__(self, sphere_channels: int, dtype=None, *, key):
        """**Arguments:**

        - `sphere_channels`: width of the node features (`channels`).
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the initialisation (checkpoints overwrite it).
        """
        self.linear = SO3Linear(sphere_channels, 1, 1, dtype, key=key)

    def __call__(self, node_features: Float[Array, "atoms coeffs channels"]) -> Float[Array, "atoms 3"]:
        """**Arguments:**

        - `node_features`: `(atoms, coeffs, channels)` backbone output, `lmax >= 1`; degrees 0
          and 1 (the first 4 coefficients) are read. (No routing: fairchem's force head is never
          dataset-specific.)

        **Returns:**

        `(atoms, 3)` forces `(x, y, z)`.
        """
        return self.linear(node_features[:, :4, :])[:, 1:4, 0]


class EnergyReferences(eqx.Module):
    """Per-task normalisation and per-element reference energies (frozen, not trained).

    Port of fairchem's predict-unit output transform (`units/mlip_unit/predict.py`,
    `Normalizer.denorm` and `ElementReferences.undo_refs`):
    `E = rmsd[d] * sum_i e_i + mean[d] + sum_i ref[d, Z_i]` for a system of dataset `d`.
    Rows follow `config.datasets`.
    """

    energy_mean: Float[Array, " datasets"]
    energy_rmsd: Float[Array, " datasets"]
    element_references: Float[Array, "datasets elements"]

    def __init__(self, num_datasets: int, num_elements: int, dtype=None):
        """**Arguments:**

        - `num_datasets`: number of datasets (`len(config.datasets)`).
        - `num_elements`: columns of the element-reference table (`config.max_num_elements`).
        - `dtype`: float dtype of the tables (default float32). They start as the identity
          transform (mean 0, rmsd 1, references 0); the converter fills them in.
        """
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
        atom_mask: Bool[Array, " atoms"],
    ) -> Float[Array, " systems"]:
        """**Arguments:**

        - `raw_energy`: `(systems,)` sums of the head's per-atom energies.
        - `dataset_index`: `(systems,)` each system's dataset (row of the tables).
        - `atomic_numbers`: `(atoms,)` element of each atom (column of `element_references`).
        - `system_index`: `(atoms,)` system of each atom.
        - `atom_mask`: `(atoms,)` `False` on padded atoms, which add no reference energy.

        **Returns:**

        `(systems,)` energies in eV.
        """
        mean, rmsd, refs = jax.lax.stop_gradient((self.energy_mean, self.energy_rmsd, self.element_references))
        atom_ref = refs[dataset_index[system_index], atomic_numbers] * atom_mask
        ref_sum = jax.ops.segment_sum(atom_ref.astype(raw_energy.dtype), system_index, num_segments=raw_energy.shape[0])
        return rmsd[dataset_index] * raw_energy + mean[dataset_index] + ref_sum
