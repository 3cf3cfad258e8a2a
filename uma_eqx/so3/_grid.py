"""Spherical grids: projection of l-major coefficients to and from an S2 grid.

Port of `fairchem.core.models.uma.common.so3.SO3_Grid` (the `lmax_lmax` grid used by
`GridAtomwise`), which builds e3nn 0.6's `ToS2Grid` / `FromS2Grid` with `normalization="integral"`
on a `2(lmax+1) x (2(lmax+1)+1)` (beta x alpha) grid. Those matrices factor into orthonormal
real spherical harmonics at the grid points: `to[b, a, i] = Y_i(p_ba)` and
`from[b, a, i] = 4 pi w_b Y_i(p_ba)` with Kostelec-Rockmore quadrature weights `w_b`.
Grid points: `beta_b = (b + 1/2) pi / B`, `alpha_a = 2 pi a / A`,
`p = (sin b sin a, cos b, sin b cos a)`.

fairchem computes these tables in the run's default dtype; they are returned in float64 here and
cast by the caller.
"""

import functools
import math

import numpy as np

from ._wigner import _sh_coefficients


def _quadrature_weights(b: int) -> np.ndarray:
    k = np.arange(b)
    j = np.arange(2 * b)[:, None]
    w = (
        (2.0 / b)
        * np.sin(math.pi * (2.0 * j[:, 0] + 1.0) / (4.0 * b))
        * np.sum((1.0 / (2 * k + 1)) * np.sin((2 * j + 1) * (2 * k + 1) * math.pi / (4.0 * b)), axis=1)
    )
    return w / (2.0 * (2 * b) ** 2)


@functools.cache
def s2_grid_matrices(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Projection matrices between l-major coefficients and the S2 grid (cached numpy).

    Port of `fairchem.core.models.uma.common.so3.SO3_Grid(lmax, lmax)`'s `to_grid_mat` and
    `from_grid_mat` (see the module docstring): `to[b, a, i] = Y_i(p_ba)`,
    `from[b, a, i] = 4 pi w_b Y_i(p_ba)`. Use as
    `grid = einsum("bai,...ic->...bac", to_grid, x)` and
    `x = einsum("bai,...bac->...ic", from_grid, grid)`.

    **Arguments:**

    - `lmax`: maximum degree; the grid is `2(lmax+1)` betas by `2(lmax+1)+1` alphas.

    **Returns:**

    `(to_grid, from_grid)`, each a float64 numpy array `(res_beta, res_alpha, coeffs)` with
    `coeffs = (lmax+1)**2`; cast to the run's dtype by the caller.
    """
    res_beta = 2 * (lmax + 1)
    res_alpha = 2 * (lmax + 1) + 1
    betas = (np.arange(res_beta) + 0.5) / res_beta * math.pi
    alphas = np.arange(res_alpha) / res_alpha * 2 * math.pi
    b, a = np.meshgrid(betas, alphas, indexing="ij")
    pts = np.stack([np.sin(b) * np.sin(a), np.cos(b), np.sin(b) * np.cos(a)], axis=-1)
    ys = []
    for l in range(lmax + 1):
        exps, coeffs = _sh_coefficients(l)
        ys.append(np.prod(pts[..., None, :] ** exps, axis=-1) @ coeffs.T)
    y = np.concatenate(ys, axis=-1)  # [B, A, L]
    qw = _quadrature_weights(res_beta // 2) * res_beta**2 / res_alpha
    to_grid = y
    from_grid = 4 * math.pi * qw[:, None, None] * y
    return to_grid, from_grid
