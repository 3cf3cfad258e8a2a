"""Linear layers over rows: plain and mixture-of-linear-experts (MoLE)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class MoLERouting(eqx.Module):
    """Expert mixing for a batch whose rows are grouped contiguously by system.

    **Attributes:**

    - `coefficients`: `(systems, experts)` mixing coefficients.
    - `group_sizes`: rows (edges or atoms) of each system, in order; they sum to the row count.
    """

    coefficients: Float[Array, "systems experts"]
    group_sizes: Int[Array, " systems"]


class Linear(eqx.Module):
    """`y = x W^T + b` over the last axis.

    Port of `torch.nn.Linear` as used throughout `fairchem.core.models.uma` (weights stored
    `(out, in)`, no transpose on conversion).
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None

    def __init__(self, in_features: int, out_features: int, use_bias: bool = True, dtype=None, *, key):
        """**Arguments:**

        - `in_features`, `out_features`: input and output widths.
        - `use_bias`: whether to add a bias.
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for torch's default initialisation, `U(-1/sqrt(in), 1/sqrt(in))`
          (checkpoints overwrite it).
        """
        dtype = jnp.float32 if dtype is None else dtype
        wkey, bkey = jax.random.split(key)
        bound = in_features**-0.5
        self.weight = jax.random.uniform(wkey, (out_features, in_features), dtype, -bound, bound)
        self.bias = jax.random.uniform(bkey, (out_features,), dtype, -bound, bound) if use_bias else None

    def __call__(self, x: Float[Array, "*rows in"], routing: MoLERouting | None = None) -> Float[Array, "*rows out"]:
        """**Arguments:**

        - `x`: `(*rows, in)` inputs.
        - `routing`: not used: a plain linear has one weight for every system. Accepted so
          that `Linear` and [`uma_eqx.nn.MoLELinear`][] are interchangeable where a layer may
          be either (e.g. a merged model's SO(2) convolutions, or plain and per-dataset heads).

        **Returns:**

        `(*rows, out)`.
        """
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class MoLELinear(eqx.Module):
    """Mixture of linear experts: system `s` uses `W_s = sum_e c[s, e] W_e` and one shared bias.

    Port of `fairchem.core.models.uma.nn.mole.MOLE`. Rows must be grouped contiguously by
    system (edges sorted by target atom, atoms sorted by system), as fairchem requires. Rows
    that all belong to one system cost one matmul with that system's merged weight; otherwise
    the cheaper of two exact evaluations is used: mixing the experts per row (cost ~ experts)
    or applying each system's merged weight (cost ~ systems). The model's edgewise layer avoids
    the mixed case (`merge_per_system`, then `expert(s)` on system-aligned chunks of edges).
    """

    weights: Float[Array, "experts out in"]
    bias: Float[Array, " out"] | None

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, use_bias: bool = True, dtype=None, *, key
    ):
        """**Arguments:**

        - `num_experts`: number of expert weights.
        - `in_features`, `out_features`: input and output widths.
        - `use_bias`: whether to add the (shared) bias.
        - `dtype`: float dtype of the parameters (default float32).
        - `key`: PRNG key for the initialisation (checkpoints overwrite it).
        """
        dtype = jnp.float32 if dtype is None else dtype
        wkey, bkey = jax.random.split(key)
        bound = in_features**-0.5
        self.weights = jax.random.uniform(wkey, (num_experts, out_features, in_features), dtype, -bound, bound)
        self.bias = jax.random.uniform(bkey, (out_features,), dtype, -bound, bound) if use_bias else None

    def __call__(self, x: Float[Array, "rows in"], routing: MoLERouting | None = None) -> Float[Array, "rows out"]:
        """**Arguments:**

        - `x`: `(rows, in)` inputs, grouped contiguously by system.
        - `routing`: the systems' expert coefficients and row counts (required; `None`
          raises, naming the fix).

        **Returns:**

        `(rows, out)`.
        """
        if routing is None:
            raise ValueError(
                "MoLELinear needs expert coefficients: call the backbone (which computes them) "
                "or merge the experts first with `uma_eqx.merge_experts`."
            )
        coefficients = routing.coefficients.astype(self.weights.dtype)
        num_systems, num_experts = coefficients.shape

        def one_system(s):
            return x @ jnp.einsum("e,eoi->oi", coefficients[s], self.weights).T

        def several_systems(_):
            rows = x.shape[0]
            row_system = jnp.repeat(jnp.arange(num_systems), routing.group_sizes, total_repeat_length=rows)
            if num_experts <= num_systems:
                # sum_e c[s(r), e] W_e x_r as one matmul over (expert, input) pairs
                mixed = (coefficients[row_system][:, :, None] * x[:, None, :]).reshape(rows, -1)
                return mixed @ jnp.swapaxes(self.weights, 1, 2).reshape(-1, self.weights.shape[1])
            w = jnp.einsum("se,eoi->soi", coefficients, self.weights)
            per_system = jnp.einsum("ri,soi->rso", x, w)
            return jnp.einsum("rs,rso->ro", jax.nn.one_hot(row_system, num_systems, dtype=x.dtype), per_system)

        if num_systems == 1:
            y = one_system(0)
        else:
            # rows of a single system (e.g. one real system plus padding systems without rows,
            # or one chunk of a batch's edges) cost one merged matmul
            s = jnp.argmax(routing.group_sizes)
            y = jax.lax.cond(routing.group_sizes[s] == x.shape[0], one_system, several_systems, s)
        return y if self.bias is None else y + self.bias

    def merge_per_system(self, coefficients: Float[Array, "systems experts"]) -> "MoLELinear":
        """An equivalent `MoLELinear` whose experts are the `systems` merged weights.

        Use it with `MoLERouting(eye(systems), group_sizes)` to merge once for many calls.
        """
        w = jnp.einsum("se,eoi->soi", coefficients.astype(self.weights.dtype), self.weights)
        return eqx.tree_at(lambda l: l.weights, self, w)

    def expert(self, index: Int[Array, ""] | int) -> Linear:
        """Expert `index` (may be traced) as a plain [`Linear`][] with the shared bias.

        After [`MoLELinear.merge_per_system`][], expert `s` is system `s`'s merged layer.
        """
        lin = eqx.filter_eval_shape(Linear, 1, 1, key=jax.random.key(0))
        w = jnp.take(self.weights, index, axis=0)
        return eqx.tree_at(lambda l: (l.weight, l.bias), lin, (w, self.bias), is_leaf=lambda v: v is None)

    def merge(self, coefficients: Float[Array, " experts"]) -> Linear:
        """A plain [`Linear`][] with weight `sum_e c[e] W_e` and the shared bias."""
        lin = eqx.filter_eval_shape(Linear, 1, 1, key=jax.random.key(0))
        w = jnp.einsum("e,eoi->oi", coefficients.astype(self.weights.dtype), self.weights)
        return eqx.tree_at(lambda l: (l.weight, l.bias), lin, (w, self.bias), is_leaf=lambda v: v is None)


def map_mole(fn, tree):
    """`tree` with every [`MoLELinear`][uma_eqx.nn.MoLELinear] `m` replaced by `fn(m)`.

    **Arguments:**

    - `fn`: maps a `MoLELinear` to its replacement (e.g. `lambda m: m.merge(c)`).
    - `tree`: any pytree of modules (a model, a block, a tuple of layers).

    **Returns:**

    The same tree with the replacements; everything else is unchanged.
    """
    is_mole = lambda m: isinstance(m, MoLELinear)  # noqa: E731
    return jax.tree.map(lambda m: fn(m) if is_mole(m) else m, tree, is_leaf=is_mole)
