"""Bad input reaching the model: hand-built graphs (checked under jit), and the model-graph
constructor's per-structure errors (`AtomicGraph.for_model`, `predict(on_error=...)`)."""

import functools

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule
from conftest import FIXTURES

import uma_eqx


@functools.cache
def _model() -> uma_eqx.UMA:
    return uma_eqx.load(FIXTURES / "uma_s_1p1.eqx", dtype=jnp.float64)


def _graph() -> uma_eqx.AtomicGraph:
    water = molecule("H2O")
    water.info.update(charge=0, spin=1)
    return uma_eqx.AtomicGraph.for_model(_model(), [bulk("Cu", "fcc", a=3.6), water], ["omat", "omol"], pad=True)


def _with(graph, where, value):
    return eqx.tree_at(where, graph, value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda g: _with(g, lambda g: g.atomic_numbers, g.atomic_numbers.at[0].set(120)), "atomic number is outside"),
        (lambda g: _with(g, lambda g: g.atomic_numbers, g.atomic_numbers.at[0].set(0)), "atomic number is outside"),
        (lambda g: _with(g, lambda g: g.edge_index, g.edge_index.at[0, 3].set(-1)), "edge_index"),
        (lambda g: _with(g, lambda g: g.edge_index, g.edge_index.at[1, 0].set(g.num_atoms)), "edge_index"),
        (lambda g: _with(g, lambda g: g.system_index, g.system_index.at[1].set(g.num_systems)), "system_index"),
        (lambda g: _with(g, lambda g: g.charge, g.charge.at[1].set(150)), "charge is outside"),
        (lambda g: _with(g, lambda g: g.spin, g.spin.at[0].set(-2)), "spin is outside"),
        (lambda g: _with(g, lambda g: g.dataset_index, g.dataset_index.at[0].set(9)), "dataset_index"),
    ],
)
def test_hand_built_graph_is_checked_under_jit(edit, match):
    # the embedding lookups would clamp these silently; the model refuses them at run time
    model, graph = _model(), edit(_graph())
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(uma_eqx.energy_forces_stress(model, graph))
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(lambda m, g: m(g))(model, graph))


def test_valid_graph_passes_the_check():
    energy = uma_eqx.energy_forces_stress(_model(), _graph())["energy"]
    assert np.all(np.isfinite(np.asarray(energy)))


def test_for_model_names_the_structure_and_resolves_tasks():
    model = _model()
    cu = bulk("Cu", "fcc", a=3.6)
    water = molecule("H2O")
    water.info.update(task="omol", charge=0, spin=1)
    graph = uma_eqx.AtomicGraph.for_model(model, [cu, water], ["omat", None])
    assert [model.config.datasets[int(i)] for i in graph.dataset_index] == ["omat", "omol"]
    bad = cu.copy()
    bad.numbers[0] = 120
    with pytest.raises(ValueError, match=r"structure #1: atomic number\(s\) 120"):
        uma_eqx.AtomicGraph.for_model(model, [cu, bad], "omat")
    with pytest.raises(ValueError, match=r"structure #0: no task given"):
        uma_eqx.AtomicGraph.for_model(model, [cu], None)
    with pytest.raises(ValueError, match="2 entries for 1 structures"):
        uma_eqx.AtomicGraph.for_model(model, [cu], ["omat", "omat"])
    close = ase.Atoms("H2", positions=[[0, 0, 0], [0.01, 0, 0]])
    with pytest.raises(ValueError, match=r"Structure #1: atoms 0 and 1 are 0.01 Å apart"):
        uma_eqx.AtomicGraph.for_model(model, [cu, close], "omat")


def test_predict_skips_bad_structures_in_place():
    model = _model()
    good = [bulk("Cu", "fcc", a=3.6), bulk("Au", "fcc", a=4.1)]
    coincident = ase.Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0]], cell=[4, 4, 4], pbc=True)
    alien = bulk("Cu", "fcc", a=3.6)
    alien.numbers[0] = 120
    frames = [good[0], coincident, good[1], alien]
    rows = uma_eqx.predict(model, frames, task_name="omat", batch_size=4, progress=False, on_error="skip")
    assert [("error" in r) for r in rows] == [False, True, False, True]
    assert rows[1]["error"].startswith("structure #1: ") and "apart" in rows[1]["error"]
    assert rows[3]["error"].startswith("structure #3: ") and "120" in rows[3]["error"]
    alone = uma_eqx.predict(model, good, task_name="omat", batch_size=4, progress=False)
    for got, want in zip([rows[0], rows[2]], alone):
        np.testing.assert_allclose(got["energy"], want["energy"], rtol=1e-12)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"structure #1: .*apart"):
        uma_eqx.predict(model, frames, task_name="omat", batch_size=4, progress=False)


def test_graph_less_precise_than_the_model_is_refused():
    model = _model()
    atoms = bulk("Cu", "fcc", a=3.6)
    graph32 = uma_eqx.AtomicGraph.for_model(model, atoms, "omat", dtype=jnp.float32)
    with pytest.raises(ValueError, match="positions are float32 but the model is float64"):
        uma_eqx.energy_forces_stress(model, graph32)
    # a float32 roll angle does not bring float32 into a float64 model
    graph = uma_eqx.AtomicGraph.for_model(model, atoms, "omat")
    angle = np.float32(0.3)
    e32 = uma_eqx.energy_forces_stress(model, graph, jnp.float32(angle))
    e64 = uma_eqx.energy_forces_stress(model, graph, jnp.float64(angle))
    np.testing.assert_array_equal(e32["energy"], e64["energy"])
    np.testing.assert_array_equal(e32["forces"], e64["forces"])
