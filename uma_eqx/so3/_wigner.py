"""Real spherical harmonics (e3nn convention, +y polar) and Wigner-D matrices.

fairchem builds its Wigner-D matrices in e3nn's real basis with +y as the polar axis
(`common/quaternion/wigner_d_hybrid.py`, `common/rotation.py` with `Jd.pt`): for `l = 1` the
basis is `(x, y, z)` and `D^1(R) = R`. Every construction of `D` in that basis gives the same
model output, so we build `D^l(R)` from its defining property `Y_l(R v) = D^l(R) Y_l(v)`:
evaluate the degree-`l` harmonics at fixed sample points `P` and at the rotated points `R P`,
then `D^l = Y_l(R P) Y_l(P)^+`. This is exact (to round-off), smooth in `R`, and cheap for the
degrees UMA uses.

The harmonics are the standard orthonormal real spherical harmonics without Condon-Shortley
phase, written with polar axis `y`, `cos(m phi)` along `z` and `sin(m phi)` along `x`, i.e.
e3nn's `(x, y, z) -> (X, Y, Z) = (z, x, y)` relabelling.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _poly_mul(p: dict, q: dict) -> dict:
    out: dict = {}
    for ea, ca in p.items():
        for eb, cb in q.items():
            e = tuple(i + j for i, j in zip(ea, eb))
            out[e] = out.get(e, 0.0) + ca * cb
    return out


def _poly_add(p: dict, q: dict, scale: float = 1.0) -> dict:
    out = dict(p)
    for e, c in q.items():
        out[e] = out.get(e, 0.0) + scale * c
    return out


def _poly_pow(p: dict, n: int) -> dict:
    out = {(0, 0, 0): 1.0}
    for _ in range(n):
        out = _poly_mul(out, p)
    return out


@functools.cache
def _sh_coefficients(l: int) -> tuple[np.ndarray, np.ndarray]:
    """Monomial exponents `[n, 3]` (powers of x, y, z) and coefficients `[2l+1, n]`."""
    # variables in (x, y, z) exponent order; e3nn relabelling X=z, Y=x, Z=y.
    X, Y, Z = {(0, 0, 1): 1.0}, {(1, 0, 0): 1.0}, {(0, 1, 0): 1.0}
    r2 = {(2, 0, 0): 1.0, (0, 2, 0): 1.0, (0, 0, 2): 1.0}
    norm = math.sqrt((2 * l + 1) / (4 * math.pi))
    rows = []
    for m_signed in range(-l, l + 1):
        m = abs(m_signed)
        pi_lm: dict = {}
        for k in range((l - m) // 2 + 1):
            c = (
                (-1) ** k
                * 2.0 ** (-l)
                * math.comb(l, k)
                * math.comb(2 * l - 2 * k, l)
                * math.factorial(l - 2 * k)
                / math.factorial(l - 2 * k - m)
            )
            term = _poly_mul(_poly_pow(r2, k), _poly_pow(Z, l - 2 * k - m))
            pi_lm = _poly_add(pi_lm, term, c)
        pi_lm = {e: c * math.sqrt(math.factorial(l - m) / math.factorial(l + m)) for e, c in pi_lm.items()}
        trig: dict = {}
        for p in range(m + 1):
            angle = (m - p) * math.pi / 2
            w = math.cos(angle) if m_signed >= 0 else math.sin(angle)
            if abs(w) > 1e-12:
                trig = _poly_add(
                    trig, _poly_mul(_poly_pow(X, p), _poly_pow(Y, m - p)), float(math.comb(m, p) * round(w))
                )
        scale = norm * (math.sqrt(2.0) if m > 0 else 1.0)
        rows.append({e: scale * c for e, c in _poly_mul(pi_lm, trig).items()})
    exps = sorted({e for row in rows for e in row})
    coeffs = np.array([[row.get(e, 0.0) for e in exps] for row in rows])
    return np.array(exps, dtype=np.int32), coeffs


def real_spherical_harmonics(l: int, vec: Float[Array, "*batch 3"]) -> Float[Array, "*batch {2*l+1}"]:
    """Orthonormal real spherical harmonics of degree `l` (e3nn order `m = -l..l`).

    Port of `e3nn.o3.spherical_harmonics(l, vec, normalize=False, normalization="integral")`
    as fairchem uses it (polar axis +y): `int_S2 Y_lm Y_lm' = delta_mm'`, written as fixed
    monomials in `(x, y, z)` (see the module docstring).

    **Arguments:**

    - `l`: the degree.
    - `vec`: points; the polynomials are homogeneous of degree `l`, so pass unit vectors to get
      values on the sphere.

    **Returns:**

    `Y_l(vec)`, shape `(*batch, 2l+1)`.
    """
    exps, coeffs = _sh_coefficients(l)
    # Each monomial as a product of static integer powers (multiplications only): `vec ** exps`
    # with an exponent array lowers to a general `pow` (exp/log) per entry, in value and gradient.
    powers = [[jnp.ones_like(vec[..., a])] for a in range(3)]
    for a in range(3):
        for _ in range(int(exps[:, a].max(initial=0))):
            powers[a].append(powers[a][-1] * vec[..., a])
    mono = jnp.stack([powers[0][i] * powers[1][j] * powers[2][k] for i, j, k in exps], axis=-1)
    return mono @ jnp.asarray(coeffs.T, dtype=vec.dtype)


@functools.cache
def _sample_points(l: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed well-spread unit points `[n, 3]` and `pinv(Y_l(P))` `[n, 2l+1]` in float64."""
    n = 2 * (2 * l + 1) + 1
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    pts = np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], -1)
    exps, coeffs = _sh_coefficients(l)
    y = np.prod(pts[:, None, :] ** exps[None], axis=-1) @ coeffs.T  # [n, 2l+1]
    return pts, np.linalg.pinv(y)


def wigner_d_from_matrix(rot: Float[Array, "3 3"], lmax: int) -> Float[Array, "{(lmax+1)**2} {(lmax+1)**2}"]:
    """Block-diagonal Wigner-D matrix of `rot` for degrees `0..lmax` (e3nn basis, l-major).

    Port of fairchem's Wigner-D of the edge frame (`common/rotation.py`,
    `common/quaternion/wigner_d_hybrid.py`), built from its defining property: satisfies
    `Y(rot @ v) = D @ Y(v)` for the stacked harmonics `Y` of [`real_spherical_harmonics`][];
    `D^0 = 1`, `D^1 = rot`, and `D^l = Y_l(R P) Y_l(P)^+` on fixed sample points `P` for `l >= 2`.

    **Arguments:**

    - `rot`: `(3, 3)` rotation matrix.
    - `lmax`: maximum degree.

    **Returns:**

    `(coeffs, coeffs)` block-diagonal matrix, `coeffs = (lmax+1)**2`, in `rot`'s dtype.
    """
    dtype = rot.dtype
    size = (lmax + 1) ** 2
    out = jnp.zeros((size, size), dtype)
    out = out.at[0, 0].set(1.0)
    if lmax >= 1:
        out = out.at[1:4, 1:4].set(rot)
    for l in range(2, lmax + 1):
        pts, pinv = _sample_points(l)
        rotated = jnp.asarray(pts, dtype) @ rot.T  # rows: R p
        y_rot = real_spherical_harmonics(l, rotated)  # [n, 2l+1]
        block = y_rot.T @ jnp.asarray(pinv.T, dtype)  # [2l+1, 2l+1]
        out = out.at[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2].set(block)
    return out
