"""The performance-motivated formulations give the plain results (float64, round-off only).

- `Edgewise` runs the edges in chunks under `jax.checkpoint`; the chunk size (with or without
  null-edge padding) and how much the backward pass keeps (`ExecutionSettings`) only change
  the summation order.
- `MoLELinear` uses one merged matmul when all rows belong to one system, and the edgewise
  layer merges the experts once per system (`MoLELinear.merge_per_system`).
- The SO(2) convolution's `m > 0` complex product uses three matmuls (Gauss) instead of one
  linear over both rows (four real products).
"""

import dataclasses
import functools
import itertools

import ase.build
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err

import uma_eqx
from uma_eqx import _backbone, _block
from uma_eqx.nn import EdgeScalars, FactoredRadialMLP, Linear, MoLELinear, MoLERouting, RadialMLP, factor_radial_mlps
from uma_eqx.nn._so2 import _complex_product, _gauss_weights, _with_weight

#: same computation in another summation order (float64)
TOL = 1e-12

_efs = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0}, static_argnames=("settings",)
)(uma_eqx.energy_forces_stress)


@functools.cache
def _model() -> uma_eqx.UMA:
    return uma_eqx.load(FIXTURES / "uma_s_1p1.eqx", dtype=jnp.float64)


@functools.cache
def _graph() -> uma_eqx.AtomicGraph:
    # two systems (MoLE routing differs per system) plus padded atoms, edges and systems
    cu = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)
    cu.rattle(0.05, seed=1)
    water = ase.build.molecule("H2O")
    return uma_eqx.AtomicGraph.from_atoms(
        [cu, water],
        cutoff=_model().config.cutoff,
        datasets=_model().config.datasets,
        task_name="omat",
        dtype=jnp.float64,
        pad=True,
    )


def _chunked(size: int | None, **changes) -> uma_eqx.ExecutionSettings:
    return uma_eqx.ExecutionSettings(edge_chunk_size=size, **changes)


def _assert_same(a: dict, b: dict):
    for key, value in a.items():
        assert rel_err(np.asarray(value), np.asarray(b[key])) < TOL, key


@pytest.mark.parametrize("merged", [False, True])
def test_edge_chunks_give_the_unchunked_sum(merged):
    model, graph = _model(), _graph()
    num_edges = graph.edge_index.shape[1]
    if merged:
        model = uma_eqx.merge_experts_for(model, graph)
    # the plain path: one chunk, fairchem's four-product form
    plain = _efs(model, graph, settings=_chunked(None, gauss_form=False, scan_blocks=False))
    _assert_same(_efs(model, graph, settings=_chunked(num_edges)), plain)
    # 7 does not divide the edge count: exercises the null-edge padding; chunks straddle systems
    assert num_edges % 7 != 0
    for size in (7, 64):
        _assert_same(_efs(model, graph, settings=_chunked(size)), plain)


@pytest.mark.parametrize("merged", [False, True])
def test_scanned_blocks_give_the_unrolled_result(merged):
    model, graph = _model(), _graph()
    if merged:
        model = uma_eqx.merge_experts_for(model, graph)
    assert len(model.backbone.blocks) > 1 and _backbone._same_structure(model.backbone.blocks)
    # the default scans a merged model and unrolls one that mixes experts in the call
    assert uma_eqx.ExecutionSettings().scans_blocks(mixes_experts=not merged) is merged
    unrolled = _efs(model, graph, settings=_chunked(64, scan_blocks=False))
    _assert_same(_efs(model, graph, settings=_chunked(64, scan_blocks=True)), unrolled)


def test_scanned_blocks_give_the_unrolled_weight_gradient():
    # a training loss's gradient in the (stacked) weights: reverse over reverse through the scan
    graph = _graph()
    model = uma_eqx.merge_experts_for(_model(), graph)

    def loss(model, settings):
        out = uma_eqx.energy_forces_stress(model, graph, settings=settings)
        return out["energy"].sum() + (out["forces"] ** 2).sum()

    grads = [eqx.filter_grad(loss)(model, _chunked(64, scan_blocks=scan)) for scan in (False, True)]
    for a, b in zip(*(jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in grads), strict=True):
        assert rel_err(np.asarray(b), np.asarray(a)) < TOL


def test_blocks_of_different_shapes_are_not_scanned():
    blocks = _model().backbone.blocks
    assert not _backbone._same_structure(blocks[:1])  # nothing to scan
    smaller = eqx.tree_at(lambda b: b.norm_1.affine_bias, blocks[1], blocks[1].norm_1.affine_bias[:-1])
    assert not _backbone._same_structure([blocks[0], smaller])


def test_residual_budget_does_not_change_results():
    model, graph = _model(), _graph()
    keep_all = _efs(model, graph, settings=_chunked(64))
    recompute_all = _chunked(64, residual_budget_bytes=0)
    assert model.backbone.blocks[0].edge_wise.saved_names(graph.edge_index.shape[1], jnp.float64, 0) == ()
    _assert_same(_efs(model, graph, settings=recompute_all), keep_all)


def test_settings_are_validated():
    for bad in ({"edge_chunk_size": 0}, {"residual_budget_bytes": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            uma_eqx.ExecutionSettings(**bad)
    # wrong types: refused by the settings' own check, or first by the test suite's type checker
    for bad in ({"gauss_form": 1}, {"matmul_precision": "float32"}, {"edge_chunk_size": 2.5}, {"scan_blocks": 1}):
        with pytest.raises((ValueError, TypeError)):
            uma_eqx.ExecutionSettings(**bad)


def _mole_reference(layer: MoLELinear, x, coefficients, row_system):
    w = jnp.einsum("se,eoi->soi", coefficients, layer.weights)[row_system]
    return jnp.einsum("roi,ri->ro", w, x) + layer.bias


@pytest.mark.parametrize("mole", [False, True])
def test_three_matmul_complex_product_matches_fairchems_four_product_form(mole):
    # fairchem's SO2_m_Conv: one linear over the +m and -m rows gives (a, b) and (c, d); the
    # outputs are (a - d, c + b)
    kx, kl, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 7, 6), jnp.float64)
    if mole:
        layer = MoLELinear(3, 6, 8, use_bias=False, dtype=jnp.float64, key=kl)
        routing = MoLERouting(jax.random.uniform(kc, (2, 3), jnp.float64), jnp.array([4, 3]))
        routing2 = MoLERouting(routing.coefficients, 2 * routing.group_sizes)
        rows = jnp.stack([x[0], x[1]], axis=1).reshape(14, 6)  # +m, -m of each edge adjacent
        y = layer(rows, routing2).reshape(7, 2, 8)
    else:
        layer, routing = Linear(6, 8, use_bias=False, dtype=jnp.float64, key=kl), None
        y = jnp.stack([layer(x[0]), layer(x[1])], axis=1)
    a, b, c, d = y[:, 0, :4], y[:, 0, 4:], y[:, 1, :4], y[:, 1, 4:]
    plus, minus = _complex_product(_with_weight(layer, _gauss_weights), x[0], x[1], routing)
    np.testing.assert_allclose(plus, a - d, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(minus, c + b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("sizes", [(9, 0, 0), (0, 9, 0), (4, 0, 5), (2, 3, 4)])
def test_mole_linear_single_and_mixed_systems(sizes):
    kx, kc, kl = jax.random.split(jax.random.key(0), 3)
    layer = MoLELinear(4, 5, 3, dtype=jnp.float64, key=kl)
    x = jax.random.normal(kx, (9, 5), jnp.float64)
    coefficients = jax.random.uniform(kc, (3, 4), jnp.float64)
    row_system = np.repeat(np.arange(3), sizes)
    expected = _mole_reference(layer, x, coefficients, row_system)
    routing = MoLERouting(coefficients, jnp.asarray(sizes))
    np.testing.assert_allclose(eqx.filter_jit(layer)(x, routing), expected, rtol=TOL, atol=TOL)
    # merged once per system, routed by the identity: the same map
    per_system = layer.merge_per_system(coefficients)
    identity = MoLERouting(jnp.eye(3, dtype=jnp.float64), jnp.asarray(sizes))
    np.testing.assert_allclose(per_system(x, identity), expected, rtol=TOL, atol=TOL)
    assert isinstance(per_system, MoLELinear) and eqx.tree_equal(per_system.bias, layer.bias)


def test_chunks_never_mix_systems_and_hold_every_live_edge_once():
    graph = _graph()
    whole, _ = _model().backbone.edge_frame(graph, 0.0, None)
    num_systems = graph.charge.shape[0]
    # also with dead edges (zero envelope, e.g. a Verlet list's pairs beyond the cutoff) inside
    # every system, not only the padding system's at the end
    holes = eqx.tree_at(lambda f: f.envelope, whole, whole.envelope.at[::3].set(0.0))
    for frame, groups, size in itertools.product((whole, holes), (1, num_systems), (7, 64, 10_000)):
        # live: a non-zero envelope; the padded edges (far vector) carry no message and are left out
        live = np.asarray(frame.envelope) != 0
        assert 0 < live.sum() < live.size
        want = sorted(
            zip(
                np.asarray(frame.source)[live],
                np.asarray(frame.target)[live],
                np.asarray(frame.x_edge.basis)[live][:, 0],
            )
        )
        chunks, chunk_system = _block._split_edges(frame, size, groups)
        real = np.asarray(jnp.abs(chunks.vector).sum(axis=-1) > 0)  # null slots have zero vectors
        systems = np.asarray(chunks.system)
        for c in range(systems.shape[0]):
            if groups > 1:
                assert set(systems[c][real[c]]) <= {int(chunk_system[c])}
            # chunks marked unused (skipped by skip_unused) hold no live edge
            assert int(chunk_system[c]) < groups or not real[c].any()
        # every live edge exactly once: compare (source, target, x_edge) multisets
        got = sorted(
            zip(
                np.asarray(chunks.source)[real],
                np.asarray(chunks.target)[real],
                np.asarray(chunks.x_edge.basis)[real][:, 0],
            )
        )
        assert got == want
        # null slots: zero envelope, hence a zero inverse rotation (no message, no gradient)
        assert not np.asarray(chunks.envelope)[~real].any()
        flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), chunks)
        _, from_edge = flat.rotations()
        assert np.isfinite(np.asarray(from_edge.matrix)).all()
        assert not np.asarray(from_edge.matrix)[~real.reshape(-1)].any()


def test_system_aligned_chunks_match_the_plain_multi_system_mole():
    # oracle: every edge at once through `MoLELinear.__call__` (per-row expert mixing), no chunks
    model, graph = _model(), _graph()
    backbone = model.backbone
    csd = backbone.system_embedding(graph)
    coefficients = backbone.router(graph, csd)
    frame, _ = backbone.edge_frame(graph, 0.0, None)
    num_systems = graph.charge.shape[0]
    routing = MoLERouting(coefficients, jax.ops.segment_sum(jnp.ones_like(frame.system), frame.system, num_systems))
    assert int((np.asarray(routing.group_sizes) > 0).sum()) >= 2
    x = jax.random.normal(
        jax.random.key(1), (graph.atomic_numbers.shape[0], 9, model.config.sphere_channels), jnp.float64
    )
    tables = backbone.source_embedding, backbone.target_embedding
    edge_wise = factor_radial_mlps(backbone.blocks[0].edge_wise, *tables)
    plain = jax.ops.segment_sum(edge_wise.messages(x, frame, routing), frame.target, x.shape[0])
    for size in (7, 64):
        settings = _chunked(size)
        chunked = jax.jit(lambda e, x, s=settings: e(x, frame, routing, s))(edge_wise, x)
        assert rel_err(np.asarray(chunked), np.asarray(plain)) < TOL


def test_edges_in_any_order_give_the_same_result():
    # The MoLE layers take each system's edges as one group of chunks; a graph whose edges
    # interleave the systems (here: shuffled, padding edges included) is grouped inside the
    # model. Oracle: the same graph with its edges in `from_atoms`' order.
    graph = _graph()
    assert int(graph.system_mask.sum()) >= 2
    order = np.random.default_rng(0).permutation(graph.edge_mask.shape[0])
    shuffled = eqx.tree_at(
        lambda g: (g.edge_index, g.edge_shift, g.edge_mask),
        graph,
        (graph.edge_index[:, order], graph.edge_shift[order], graph.edge_mask[order]),
    )
    edge_system = np.asarray(shuffled.system_index)[np.asarray(shuffled.edge_index[1])]
    assert (np.diff(edge_system) < 0).any()  # the systems' edges really are interleaved
    model = _model()
    expected, got = _efs(model, graph), _efs(model, shuffled)
    for key in ("energy", "forces", "stress"):
        assert rel_err(np.asarray(got[key]), np.asarray(expected[key])) < TOL, key


def test_config_elements_are_validated():
    model = _model()
    for bad in ((0,), (29, 29), (29, 200)):
        with pytest.raises(ValueError, match="UMAConfig.elements"):
            dataclasses.replace(model.config, elements=bad)


def test_gate_on_m_blocks_equals_gate_on_all_rows():
    # Edgewise gates the first SO(2) convolution's output block by block (m = 0, +-1, +-2);
    # the oracle is the one-array gate over the m-major rows (fairchem's `m_prime=True`).
    from uma_eqx.nn import gate_activation, gate_activation_blocks
    from uma_eqx.so3 import coefficient_layout

    for lmax, mmax in ((2, 2), (3, 1), (1, 1)):
        layout = coefficient_layout(lmax, mmax)
        k1, k2 = jax.random.split(jax.random.key(lmax * 10 + mmax))
        x = jax.random.normal(k1, (6, layout.num_m_coeffs, 4), jnp.float64)
        gates = jax.random.normal(k2, (6, lmax * 4), jnp.float64)
        blocks = jnp.split(x, np.cumsum(layout.m_block_sizes)[:-1], axis=1)
        got = jnp.concatenate(gate_activation_blocks(gates, blocks, layout.m_block_degrees), axis=1)
        np.testing.assert_array_equal(got, gate_activation(gates, x, layout.l_of_m_row))
        assert [len(d) for d in layout.m_block_degrees] == list(layout.m_block_sizes)


def test_factored_radial_mlp_equals_the_mlp_on_concatenated_features():
    # oracle: the radial MLP on fairchem's concatenated `[basis, source_emb[z_s], target_emb[z_t]]`
    k = jax.random.split(jax.random.key(3), 5)
    num_basis, c, elements, edges = 16, 8, 10, 37
    mlp = RadialMLP([num_basis + 2 * c, 12, 12, 20], jnp.float64, key=k[0])
    source_embedding = jax.random.normal(k[1], (elements, c), jnp.float64)
    target_embedding = jax.random.normal(k[2], (elements, c), jnp.float64)
    z = jax.random.randint(k[3], (2, edges), 0, elements)
    scalars = EdgeScalars(jax.random.uniform(k[4], (edges, num_basis), jnp.float64), z[0], z[1])
    want = mlp(scalars.dense(source_embedding, target_embedding))
    np.testing.assert_allclose(mlp.factored(source_embedding, target_embedding)(scalars), want, rtol=1e-12, atol=1e-12)
    # the gradient in the basis (the only position-dependent part) matches too
    dense_grad = jax.grad(lambda b: mlp(EdgeScalars(b, z[0], z[1]).dense(source_embedding, target_embedding)).sum())
    factored = mlp.factored(source_embedding, target_embedding)
    factored_grad = jax.grad(lambda b: factored(EdgeScalars(b, z[0], z[1])).sum())
    np.testing.assert_allclose(factored_grad(scalars.basis), dense_grad(scalars.basis), rtol=1e-12, atol=1e-12)
    # mismatched widths are refused, not sliced silently
    wide = jnp.zeros((elements, 20), jnp.float64)
    with pytest.raises(ValueError, match="do not fit"):
        mlp.factored(wide, wide)
    narrow = mlp.factored(source_embedding[:, :3], target_embedding[:, :3])  # fits, as a 26-function basis
    with pytest.raises(ValueError, match="basis has 16 functions, this MLP takes 26"):
        narrow(scalars)
    with pytest.raises(ValueError, match="basis has 5 functions"):
        factored(EdgeScalars(scalars.basis[:, :5], z[0], z[1]))
    # `factor_radial_mlps` swaps every RadialMLP of a tree and nothing else
    tree = factor_radial_mlps({"a": mlp, "b": [mlp, 3]}, source_embedding, target_embedding)
    assert isinstance(tree["a"], FactoredRadialMLP) and isinstance(tree["b"][0], FactoredRadialMLP)
    assert tree["b"][1] == 3
