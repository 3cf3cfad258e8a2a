"""`uma_eqx.so3`: real spherical harmonics, Wigner-D, edge rotations, coefficient layout, S2 grid.

Torch-free property tests, plus cross-checks against e3nn and fairchem (skipped when those
are not installed). Everything runs in float64 (`conftest.py` enables x64).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uma_eqx import so3
from uma_eqx._constants import QUATERNION_BLEND_START, QUATERNION_BLEND_WIDTH
from uma_eqx.so3._grid import s2_grid_matrices

#: Round-off bounds (absolute, float64) for exact identities on O(1) quantities.
ATOL_EXACT = 1e-12
#: Central-difference step and its agreement with a Jacobian (truncation ~h^2).
FD_STEP = 1e-6
ATOL_FD = 1e-7
#: e3nn 0.6 builds D from float32 J matrices (`o3/_wigner.py: _Jd`): its D^1 is 2e-7 off R,
#: its D^6 1.2e-6 off ours, in float64.
ATOL_E3NN_WIGNER = 5e-6
#: Degrees checked for the harmonics / Wigner-D.
LMAX_SH = 6

Y_AXIS = np.array([0.0, 1.0, 0.0])


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


_wigner = jax.jit(so3.wigner_d_from_matrix, static_argnums=1)


def _stacked_sh(lmax, vec):
    return jnp.concatenate([so3.real_spherical_harmonics(l, vec) for l in range(lmax + 1)], axis=-1)


def _edges_with_ey(ey_values, rng):
    """Unit vectors with the given y components and random azimuths."""
    phi = rng.uniform(0, 2 * math.pi, size=len(ey_values))
    ey = np.asarray(ey_values, np.float64)
    rho = np.sqrt(np.clip(1 - ey**2, 0, None))
    return np.stack([rho * np.sin(phi), ey, rho * np.cos(phi)], axis=-1)


# --------------------------------------------------------------------- spherical harmonics


@pytest.mark.parametrize("l", range(LMAX_SH + 1))
def test_real_sh_matches_e3nn(l):
    torch = pytest.importorskip("torch")
    o3 = pytest.importorskip("e3nn.o3")
    rng = np.random.default_rng(l)
    vec = np.concatenate([_unit(rng.normal(size=(50, 3))), np.eye(3), -np.eye(3)])
    ours = np.asarray(so3.real_spherical_harmonics(l, jnp.asarray(vec)))
    ref = o3.spherical_harmonics(l, torch.tensor(vec, dtype=torch.float64), normalize=True, normalization="integral")
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=ATOL_EXACT)


def _grid_points(lmax):
    """fairchem's S2 grid points `(beta, alpha)` for `lmax`, as unit vectors (+y polar)."""
    beta = (np.arange(2 * (lmax + 1)) + 0.5) / (2 * (lmax + 1)) * math.pi
    alpha = np.arange(2 * (lmax + 1) + 1) / (2 * (lmax + 1) + 1) * 2 * math.pi
    b, a = np.meshgrid(beta, alpha, indexing="ij")
    return np.stack([np.sin(b) * np.sin(a), np.cos(b), np.sin(b) * np.cos(a)], axis=-1)


def test_real_sh_orthonormal_and_l1_is_xyz():
    # torch-free: Y_1 = sqrt(3/4pi) (x, y, z), and orthonormality on the sphere, integrated
    # exactly with the S2 quadrature (products of degree <= 2*3 on the lmax=6 grid); the
    # weights 4 pi w_b are read off the l=0 column of from_grid.
    rng = np.random.default_rng(0)
    v = _unit(rng.normal(size=(20, 3)))
    y1 = np.asarray(so3.real_spherical_harmonics(1, jnp.asarray(v)))
    np.testing.assert_allclose(y1, math.sqrt(3 / (4 * math.pi)) * v, atol=ATOL_EXACT)
    lmax, lmax_grid = 3, 6
    _, from_grid = s2_grid_matrices(lmax_grid)
    weights = from_grid[..., 0] * math.sqrt(4 * math.pi)
    y = np.asarray(_stacked_sh(lmax, jnp.asarray(_grid_points(lmax_grid))))
    gram = np.einsum("ba,bai,baj->ij", weights, y, y)
    np.testing.assert_allclose(gram, np.eye((lmax + 1) ** 2), atol=ATOL_EXACT)


# ------------------------------------------------------------------------------- Wigner-D


def test_wigner_d_rotates_harmonics():
    rng = np.random.default_rng(1)
    for _ in range(3):
        rot = _random_rotation(rng)
        d = _wigner(jnp.asarray(rot), LMAX_SH)
        v = _unit(rng.normal(size=(30, 3)))
        lhs = _stacked_sh(LMAX_SH, jnp.asarray(v @ rot.T))
        rhs = _stacked_sh(LMAX_SH, jnp.asarray(v)) @ d.T
        np.testing.assert_allclose(lhs, rhs, atol=1e-11)


def test_wigner_d_orthogonal_block_diagonal_and_l1_is_r():
    rng = np.random.default_rng(2)
    rot = _random_rotation(rng)
    d = np.asarray(_wigner(jnp.asarray(rot), LMAX_SH))
    n = (LMAX_SH + 1) ** 2
    np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-11)
    l_of = so3.coefficient_layout(LMAX_SH, LMAX_SH).l_of_coeff
    off_block = l_of[:, None] != l_of[None, :]
    assert np.all(d[off_block] == 0.0)
    assert d[0, 0] == 1.0
    np.testing.assert_allclose(d[1:4, 1:4], rot, atol=ATOL_EXACT)
    for l in range(LMAX_SH + 1):  # proper rotations: det of every block is +1
        block = d[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2]
        assert abs(np.linalg.det(block) - 1.0) < 1e-10, l


def test_wigner_d_homomorphism_and_inverse():
    rng = np.random.default_rng(3)
    r1, r2 = _random_rotation(rng), _random_rotation(rng)

    def d(r):
        return np.asarray(_wigner(jnp.asarray(r), LMAX_SH))

    np.testing.assert_allclose(d(r1 @ r2), d(r1) @ d(r2), atol=1e-11)
    np.testing.assert_allclose(d(r1.T), d(r1).T, atol=1e-11)
    np.testing.assert_allclose(d(np.eye(3)), np.eye((LMAX_SH + 1) ** 2), atol=ATOL_EXACT)


def test_wigner_d_matches_e3nn():
    torch = pytest.importorskip("torch")
    o3 = pytest.importorskip("e3nn.o3")
    rot = _random_rotation(np.random.default_rng(4))
    ours = np.asarray(_wigner(jnp.asarray(rot), LMAX_SH))
    for l in range(LMAX_SH + 1):
        ref = o3.Irrep(l, (-1) ** l).D_from_matrix(torch.tensor(rot, dtype=torch.float64)).numpy()
        block = ours[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2]
        np.testing.assert_allclose(block, ref, atol=ATOL_E3NN_WIGNER, err_msg=f"l={l}")


# ------------------------------------------------------------------------ edge rotations

_rotation = jax.jit(so3.edge_rotation_matrix)


def _check_maps_to_y(vecs, roll=0.0):
    for v in np.asarray(vecs):
        r = np.asarray(_rotation(jnp.asarray(v), roll))
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=ATOL_EXACT)
        assert abs(np.linalg.det(r) - 1.0) < ATOL_EXACT
        np.testing.assert_allclose(r @ v / np.linalg.norm(v), Y_AXIS, atol=ATOL_EXACT, err_msg=str(v))


def test_edge_rotation_maps_random_edges_to_y():
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(40, 3)) * rng.uniform(0.5, 6.0, size=(40, 1))
    _check_maps_to_y(vecs)


def test_edge_rotation_at_the_poles():
    for scale in (1.0, 0.3, 5.0):
        _check_maps_to_y([scale * Y_AXIS, -scale * Y_AXIS])
    r_up = np.asarray(_rotation(jnp.asarray(Y_AXIS), 0.0))
    np.testing.assert_allclose(r_up, np.eye(3), atol=ATOL_EXACT)  # chart 1 at +y is the identity


def test_edge_rotation_across_the_chart_blend():
    # both chart-only caps, the blend boundaries, the blend interior and the equator
    start, end = QUATERNION_BLEND_START, QUATERNION_BLEND_START + QUATERNION_BLEND_WIDTH
    ey = [-1 + 1e-12, -0.99, start - 1e-9, start, start + 1e-9, -0.5, 0.0, 1e-13, 0.5]
    ey += [end - 1e-9, end, end + 1e-9, 0.99]
    _check_maps_to_y(_edges_with_ey(ey, np.random.default_rng(6)))


def test_roll_rotates_about_y():
    rng = np.random.default_rng(7)
    for v in list(rng.normal(size=(5, 3))) + [Y_AXIS, -Y_AXIS]:
        for roll in (0.4, -2.1, math.pi):
            r0 = np.asarray(_rotation(jnp.asarray(v), 0.0))
            r = np.asarray(_rotation(jnp.asarray(v), roll))
            k = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])  # cross product with +y
            r_y = np.eye(3) + math.sin(roll) * k + (1 - math.cos(roll)) * k @ k  # Rodrigues
            np.testing.assert_allclose(r, r_y @ r0, atol=ATOL_EXACT)
            np.testing.assert_allclose(r @ _unit(v), Y_AXIS, atol=ATOL_EXACT)


# Points where the Jacobians must be finite and correct: the poles, points just off them,
# the chart-blend boundaries, a generic point.
_GRAD_POINTS = [
    2.0 * Y_AXIS,
    -2.0 * Y_AXIS,
    np.array([1e-9, 1.0, -2e-9]),
    np.array([3e-9, -1.0, 1e-9]),
    *_edges_with_ey(
        [QUATERNION_BLEND_START, QUATERNION_BLEND_START + QUATERNION_BLEND_WIDTH], np.random.default_rng(8)
    ),
    np.array([0.3, -0.4, 1.2]),
]


def _central_difference(f, v):
    cols = []
    for k in range(3):
        e = np.zeros(3)
        e[k] = FD_STEP
        cols.append((np.asarray(f(jnp.asarray(v + e))) - np.asarray(f(jnp.asarray(v - e)))) / (2 * FD_STEP))
    return np.stack(cols, axis=-1)


def test_rotation_and_wigner_gradients_finite_and_correct_at_poles():
    # D^1 = R, so the Jacobian of the lmax=4 Wigner-D covers edge_rotation_matrix too.
    lmax = 4

    def wigner(v):
        return so3.wigner_d_from_matrix(so3.edge_rotation_matrix(v, 0.7), lmax)

    f, fwd_jac, rev_jac = jax.jit(wigner), jax.jit(jax.jacfwd(wigner)), jax.jit(jax.jacrev(wigner))
    with jax.debug_nans(True):
        for v in _GRAD_POINTS:
            fwd, rev = np.asarray(fwd_jac(jnp.asarray(v))), np.asarray(rev_jac(jnp.asarray(v)))
            assert np.all(np.isfinite(fwd)) and np.all(np.isfinite(rev)), v
            np.testing.assert_allclose(fwd, rev, atol=ATOL_EXACT, err_msg=str(v))
            np.testing.assert_allclose(fwd, _central_difference(f, v), atol=ATOL_FD, err_msg=str(v))
            # an edge's rotation does not change when the edge is scaled: zero radial derivative
            np.testing.assert_allclose(fwd @ v, 0.0, atol=ATOL_FD, err_msg=str(v))


def test_safe_norm_gradient_at_zero():
    with jax.debug_nans(True):
        g = jax.grad(so3.safe_norm)(jnp.zeros(3))
    np.testing.assert_array_equal(g, np.zeros(3))
    np.testing.assert_allclose(jax.grad(so3.safe_norm)(jnp.array([3.0, 0.0, 4.0])), [0.6, 0.0, 0.8], atol=ATOL_EXACT)


# ---------------------------------------------------------------------- coefficient layout

_LAYOUTS = [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 1), (4, 2), (4, 4), (6, 2), (6, 3)]


@pytest.mark.parametrize("lmax,mmax", _LAYOUTS)
def test_layout_matches_fairchem_to_m(lmax, mmax):
    pytest.importorskip("torch")
    so3_fc = pytest.importorskip("fairchem.core.models.uma.common.so3")
    mapping = so3_fc.CoefficientMapping(lmax, mmax)
    to_m = mapping.to_m.numpy()
    # fairchem's to_m acts on its reduced l-major layout (|m| <= min(l, mmax)); express each
    # input in our full l-major index l^2 + l + m.
    l_red = mapping.l_harmonic.numpy()
    m_red = mapping.m_complex.numpy()
    full_index = l_red * l_red + l_red + m_red
    assert np.all(to_m.sum(axis=1) == 1) and np.all(to_m.sum(axis=0) == 1)
    expected = full_index[np.argmax(to_m, axis=1)]
    layout = so3.coefficient_layout(lmax, mmax)
    np.testing.assert_array_equal(layout.m_major_rows, expected)
    np.testing.assert_array_equal(layout.l_of_m_row, l_red[np.argmax(to_m, axis=1)])
    assert list(layout.m_sizes) == list(mapping.m_size)
    assert layout.num_m_coeffs == mapping.res_size


def test_layout_torch_free():
    layout = so3.coefficient_layout(3, 2)
    # m=0: l=0..3 -> 0, 2, 6, 12; +1: l=1..3 -> 3, 7, 13; -1: 1, 5, 11; +2: l=2,3 -> 8, 14; -2: 4, 10
    np.testing.assert_array_equal(layout.m_major_rows, [0, 2, 6, 12, 3, 7, 13, 1, 5, 11, 8, 14, 4, 10])
    np.testing.assert_array_equal(layout.l_of_coeff, [0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3])
    assert layout.m_sizes == (4, 3, 2)
    for bad in ((2, 3), (-1, 0), (2, -1)):
        with pytest.raises(ValueError, match="mmax"):
            so3.coefficient_layout(*bad)


# ------------------------------------------------------------------------------ S2 grid


@pytest.mark.parametrize("lmax", [1, 2, 3, 4, 6])
def test_s2_grid_matches_fairchem(lmax):
    torch = pytest.importorskip("torch")
    so3_fc = pytest.importorskip("fairchem.core.models.uma.common.so3")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        grid = so3_fc.SO3_Grid(lmax, lmax)
        ref_to, ref_from = grid.to_grid_mat.numpy(), grid.from_grid_mat.numpy()
    finally:
        torch.set_default_dtype(previous)
    to_grid, from_grid = s2_grid_matrices(lmax)
    assert to_grid.shape == ref_to.shape and from_grid.shape == ref_from.shape
    np.testing.assert_allclose(to_grid, ref_to, rtol=0, atol=1e-12 * np.abs(ref_to).max())
    np.testing.assert_allclose(from_grid, ref_from, rtol=0, atol=1e-12 * np.abs(ref_from).max())


@pytest.mark.parametrize("lmax", [1, 2, 4, 6])
def test_s2_grid_round_trip(lmax):
    to_grid, from_grid = s2_grid_matrices(lmax)
    n = (lmax + 1) ** 2
    assert to_grid.shape == (2 * (lmax + 1), 2 * (lmax + 1) + 1, n) == from_grid.shape
    x = np.random.default_rng(lmax).normal(size=(n, 5))
    grid = np.einsum("bai,ic->bac", to_grid, x)
    np.testing.assert_allclose(np.einsum("bai,bac->ic", from_grid, grid), x, atol=1e-12)
    # to_grid holds the harmonics at fairchem's grid points (beta polar from +y, alpha from +z)
    y = np.asarray(_stacked_sh(lmax, jnp.asarray(_grid_points(lmax))))
    np.testing.assert_allclose(to_grid, y, atol=ATOL_EXACT)


def test_rotate_value_and_derivatives_match_plain_einsum():
    # `so3.Rotation` swaps in a transposed copy for the backward pass; the oracle is the plain
    # product `so3.rotate` and its autodiff: value, VJP, JVP and a second derivative (as
    # `jax.hessian` takes).
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    m = jax.random.normal(k1, (7, 5, 4), jnp.float64)
    x = jax.random.normal(k2, (7, 4, 3), jnp.float64)
    g = jax.random.normal(k3, (7, 5, 3), jnp.float64)
    t = jax.random.normal(k4, (7, 4, 3), jnp.float64)

    def plain(m, x):
        return so3.rotate(m, x)

    def fast(m, x):
        return so3.Rotation.of(m)(x)

    np.testing.assert_array_equal(plain(m, x), jnp.einsum("erk,ekc->erc", m, x))

    np.testing.assert_allclose(fast(m, x), plain(m, x), rtol=1e-14)
    for got, want in zip(jax.vjp(fast, m, x)[1](g), jax.vjp(plain, m, x)[1](g)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        jax.jvp(fast, (m, x), (m * 0.5, t))[1], jax.jvp(plain, (m, x), (m * 0.5, t))[1], rtol=1e-12, atol=1e-13
    )

    def scalar(fn):
        return lambda s: jnp.sum(jnp.sin(fn(m * s, x * s)))

    np.testing.assert_allclose(jax.hessian(scalar(fast))(1.3), jax.hessian(scalar(plain))(1.3), rtol=1e-11)
    # the transposed copy is a computational aid: perturbing it alone changes nothing
    ones = jnp.ones((7, 4, 5), jnp.float64)
    assert not np.any(jax.jvp(lambda mt: so3.Rotation(m, mt)(x), (jnp.swapaxes(m, 1, 2),), (ones,))[1])
