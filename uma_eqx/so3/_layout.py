"""Spherical-harmonic coefficient layouts (l-major and m-major) and index tables.

Port of `fairchem.core.models.uma.common.so3.CoefficientMapping` (`to_m`, `m_size`,
`coefficient_idx`) and the expand indices of `nn/activation.py:GateActivation` and
`nn/layer_norm.py`. Everything here is a cached numpy table built at trace time.

Layout conventions:

- **l-major** ("coeffs"): index `l**2 + l + m` for `l = 0..lmax`, `m = -l..l` (e3nn order).
- **m-major** ("m_coeffs", edge frame, only `|m| <= mmax`): `[m=0: l=0..lmax]`, then for each
  `m = 1..mmax`: `[+m: l=m..lmax]` followed by `[-m: l=m..lmax]`.
"""

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class CoefficientLayout:
    """Index tables for one `(lmax, mmax)` pair (plain numpy, built once per pair).

    Port of `fairchem.core.models.uma.common.so3.CoefficientMapping`: `m_major_rows` is its
    `to_m` permutation restricted to `|m| <= mmax`, `m_sizes` its `m_size`.

    **Attributes:**

    - `lmax`, `mmax`: maximum degree and order.
    - `l_of_coeff`: `(lmax+1)**2` degrees of the l-major coefficients.
    - `m_major_rows`: for each m-major row, its l-major index (selects `|m| <= mmax`).
    - `l_of_m_row`: degree of each m-major row.
    - `m_sizes`: number of degrees for each `m = 0..mmax` (`lmax - m + 1`).
    """

    lmax: int
    mmax: int
    l_of_coeff: np.ndarray
    m_major_rows: np.ndarray
    l_of_m_row: np.ndarray
    m_sizes: tuple[int, ...]

    @property
    def num_coeffs(self) -> int:
        """`(lmax+1)**2`, the l-major coefficients (`coeffs`)."""
        return (self.lmax + 1) ** 2

    @property
    def num_m_coeffs(self) -> int:
        """Rows kept in the edge frame (`m_coeffs`, those with `|m| <= mmax`)."""
        return len(self.m_major_rows)

    @property
    def m_block_sizes(self) -> tuple[int, ...]:
        """Rows of each m-major block: `m = 0`, then `+m` and `-m` for `m = 1..mmax`."""
        return (self.m_sizes[0],) + tuple(n for n in self.m_sizes[1:] for _ in (0, 1))

    @property
    def m_block_degrees(self) -> tuple[np.ndarray, ...]:
        """`l_of_m_row` split into the blocks of `m_block_sizes`."""
        return tuple(np.split(self.l_of_m_row, np.cumsum(self.m_block_sizes)[:-1]))


@functools.cache
def coefficient_layout(lmax: int, mmax: int) -> CoefficientLayout:
    """Build (and cache) the index tables for `(lmax, mmax)`.

    **Arguments:**

    - `lmax`: maximum degree, `>= 0`.
    - `mmax`: maximum order kept in the edge frame, `0 <= mmax <= lmax`.

    **Returns:**

    A [`CoefficientLayout`][].
    """
    if lmax < 0 or not 0 <= mmax <= lmax:
        raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
    l_of_coeff = np.concatenate([np.full(2 * l + 1, l) for l in range(lmax + 1)])
    rows = [l * l + l for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        rows += [l * l + l + m for l in range(m, lmax + 1)]
        rows += [l * l + l - m for l in range(m, lmax + 1)]
    rows = np.asarray(rows, dtype=np.int32)
    return CoefficientLayout(
        lmax=lmax,
        mmax=mmax,
        l_of_coeff=l_of_coeff.astype(np.int32),
        m_major_rows=rows,
        l_of_m_row=l_of_coeff[rows].astype(np.int32),
        m_sizes=tuple(lmax - m + 1 for m in range(mmax + 1)),
    )
