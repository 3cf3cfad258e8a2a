"""jaxtyping aliases and the dimension glossary used in every signature.

Dimension names:

- `atoms`: atoms in a (padded) batch of systems.
- `edges`: directed edges (source `j` -> target `i`) of the radius graph.
- `systems`: systems (structures) in a batch.
- `coeffs`: spherical-harmonic coefficients in l-major order, `(lmax + 1)**2`.
- `m_coeffs`: coefficients kept in the edge frame (`|m| <= mmax`), m-major order.
- `channels`: feature channels.
- `experts`: MoLE experts.
- `basis`: radial basis functions.
"""

import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = ["Array", "Bool", "Float", "Int", "PRNGKeyArray", "jax"]
