"""Edge -> frame rotations with NaN-safe derivatives.

Port of `fairchem.core.models.uma.common.quaternion.quaternion_utils.quaternion_edge_to_y_stable`
(two quaternion charts blended by a C-infinity smooth step). The roll angle about +y, drawn at
random inside fairchem's forward, is an explicit argument here (default 0): the model output is
mathematically independent of it.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._constants import QUATERNION_BLEND_START, QUATERNION_BLEND_WIDTH


def safe_norm(x: Float[Array, "... d"], axis: int = -1) -> Float[Array, "..."]:
    """Euclidean norm whose gradient is 0 (not NaN) at `x = 0` (double-`where`).

    `|x| = sqrt(sum_d x_d^2)`; replaces the reference's `torch.linalg.norm`, whose gradient
    at 0 is NaN.

    **Arguments:**

    - `x`: vectors, any leading shape.
    - `axis`: the axis to reduce (default the last).

    **Returns:**

    The norms, `x`'s shape without `axis`.
    """
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _safe_normalize(q: Float[Array, "4"]) -> Float[Array, "4"]:
    sq = jnp.sum(q * q)
    ok = sq > jnp.finfo(q.dtype).tiny
    q_safe = jnp.where(ok, q, jnp.array([1.0, 0.0, 0.0, 0.0], q.dtype))
    return q_safe / jnp.sqrt(jnp.sum(q_safe * q_safe))


def _smooth_step(t: Float[Array, ""]) -> Float[Array, ""]:
    # sigmoid((2t-1)/(t(1-t))) with t clamped to [0, 1] and the denominator clamped to eps,
    # as `quaternion_utils._smooth_step_cinf`; exactly 0 / 1 (with zero slope) at the ends.
    t = jnp.clip(t, 0.0, 1.0)
    eps = jnp.finfo(t.dtype).eps
    denom = jnp.maximum(t * (1.0 - t), eps)
    return jax.nn.sigmoid((2.0 * t - 1.0) / denom)


def edge_to_y_quaternion(unit_vec: Float[Array, "3"]) -> Float[Array, "4"]:
    """Quaternion `(w, x, y, z)` of a rotation taking the unit vector `unit_vec` to +y.

    Chart 1 `normalize(1+ey, -ez, 0, ex)` (singular at -y) and chart 2
    `normalize(-ez, 1-ey, ex, 0)` (singular at +y) are blended by sign-aligned NLERP with
    weight `smooth_step((ey + 0.9) / 1.8)` on chart 1.

    **Arguments:**

    - `unit_vec`: `(3,)` unit edge direction.

    **Returns:**

    `(4,)` unit quaternion `(w, x, y, z)`.
    """
    ex, ey, ez = unit_vec[0], unit_vec[1], unit_vec[2]
    zero = jnp.zeros_like(ex)
    q1 = _safe_normalize(jnp.stack([1.0 + ey, -ez, zero, ex]))
    q2 = _safe_normalize(jnp.stack([-ez, 1.0 - ey, ex, zero]))
    t = _smooth_step((ey - QUATERNION_BLEND_START) / QUATERNION_BLEND_WIDTH)
    q1 = jnp.where(jnp.dot(q1, q2) < 0, -q1, q1)
    return _safe_normalize((1.0 - t) * q2 + t * q1)


def quaternion_to_matrix(q: Float[Array, "4"]) -> Float[Array, "3 3"]:
    """Rotation matrix of a unit quaternion `(w, x, y, z)` (Hamilton convention).

    Port of `common/quaternion/wigner_d_custom_kernels.quaternion_to_rotation_matrix`:
    `R = I + 2 w [v]_x + 2 [v]_x^2` for `v = (x, y, z)`.

    **Arguments:**

    - `q`: `(4,)` unit quaternion.

    **Returns:**

    `(3, 3)` rotation matrix.
    """
    w, x, y, z = q[0], q[1], q[2], q[3]
    return jnp.stack(
        [
            jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
            jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
            jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
        ]
    )


def edge_rotation_matrix(edge_vec: Float[Array, "3"], roll: Float[Array, ""] | float = 0.0) -> Float[Array, "3 3"]:
    """Rotation `R` with `R @ edge_vec / |edge_vec| = +y`, followed by a roll about +y.

    Port of the edge frame fairchem builds from `quaternion_utils.quaternion_edge_to_y_stable`
    and its random roll `quaternion_y_rotation(gamma)`:
    `R = R_y(roll) R_q(edge_to_y_quaternion(edge_vec / |edge_vec|))`.

    **Arguments:**

    - `edge_vec`: a non-zero edge vector.
    - `roll`: rotation angle about +y applied after aligning (fairchem draws it uniformly at
      random; any value gives the same model output up to round-off).

    **Returns:**

    The `(3, 3)` rotation matrix.
    """
    unit = edge_vec / safe_norm(edge_vec)
    r_edge = quaternion_to_matrix(edge_to_y_quaternion(unit))
    roll = jnp.asarray(roll, r_edge.dtype)  # cos/sin in the edge's precision, not the angle's
    c, s = jnp.cos(roll), jnp.sin(roll)
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    r_roll = jnp.stack([jnp.stack([c, zero, s]), jnp.stack([zero, one, zero]), jnp.stack([-s, zero, c])]).astype(
        r_edge.dtype
    )
    return r_roll @ r_edge
