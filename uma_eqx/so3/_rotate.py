"""Applying one small matrix per edge: the plain product and a paired form for speed."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rotate(
    matrix: Float[Array, "edges rows cols"], x: Float[Array, "edges cols channels"]
) -> Float[Array, "edges rows channels"]:
    """Apply one small matrix per edge: `y_e = M_e x_e`.

    The plain product, `einsum("erk,ekc->erc", matrix, x)`, with JAX's own derivative. It is
    the oracle of [`uma_eqx.so3.Rotation`][], the form the model uses.

    **Arguments:**

    - `matrix`: `(edges, rows, cols)`, e.g. Wigner-D rows of the edge frame.
    - `x`: `(edges, cols, channels)` features.

    **Returns:**

    `(edges, rows, channels)`.
    """
    return jnp.einsum("erk,ekc->erc", matrix, x)


class Rotation(eqx.Module):
    """One small matrix per edge, stored with its transpose: `rotation(x) == rotate(matrix, x)`.

    An execution detail, not maths: the backward pass of `x -> M x` is `g -> M^T g`. Written
    with `M` contracted on its first axis, XLA's CPU backend runs that product with its
    generic batched-dot emitter, 3-4x slower than the `(rows, cols) x (cols, channels)` form
    it hands to YNNPACK; keeping `M^T` as an array made once (outside the edge loop) gives
    the backward pass the fast form. The derivative is the ordinary bilinear one (forward-
    and reverse-mode, any order; the tangent of `matrix_t` is ignored, that of `matrix` used).

    Build it with [`uma_eqx.so3.Rotation.of`][]; `Rotation(matrix, matrix_t)` takes a
    transpose you already have (checked for shape only).

    **Fields:**

    - `matrix`: `(edges, rows, cols)`.
    - `matrix_t`: `swapaxes(matrix, 1, 2)`.
    """

    matrix: Float[Array, "edges rows cols"]
    matrix_t: Float[Array, "edges cols rows"]

    @classmethod
    def of(cls, matrix: Float[Array, "edges rows cols"]) -> "Rotation":
        """The rotation `matrix`, with its transpose made once here.

        **Arguments:**

        - `matrix`: `(edges, rows, cols)`.

        **Returns:**

        The `Rotation`.
        """
        return cls(matrix, jnp.swapaxes(matrix, 1, 2))

    def columns(self, stop: int) -> "Rotation":
        """The rotation restricted to its first `stop` input columns (e.g. the `m = 0` rows).

        **Arguments:**

        - `stop`: number of leading columns kept.

        **Returns:**

        A `Rotation` of shape `(edges, rows, stop)`.
        """
        return Rotation(self.matrix[:, :, :stop], self.matrix_t[:, :stop])

    def __call__(self, x: Float[Array, "edges cols channels"]) -> Float[Array, "edges rows channels"]:
        """`M_e x_e` for every edge.

        **Arguments:**

        - `x`: `(edges, cols, channels)` features.

        **Returns:**

        `(edges, rows, channels)`, equal to `rotate(self.matrix, x)`.
        """
        return _paired_product(self.matrix, self.matrix_t, x)


@jax.custom_jvp
def _paired_product(
    matrix: Float[Array, "edges rows cols"],
    matrix_t: Float[Array, "edges cols rows"],
    x: Float[Array, "edges cols channels"],
) -> Float[Array, "edges rows channels"]:
    return rotate(matrix, x)


@_paired_product.defjvp
def _paired_product_jvp(primals, tangents):
    matrix, matrix_t, x = primals
    matrix_dot, _, x_dot = tangents
    # `x_dot` through `matrix_t`: transposing this linear map gives `matrix_t @ cotangent`.
    tangent = jnp.einsum("ekr,ekc->erc", matrix_t, x_dot) + jnp.einsum("erk,ekc->erc", matrix_dot, x)
    return _paired_product(matrix, matrix_t, x), tangent
