"""Layer contracts: checked variant arguments, hyperparameter constructors, documented arguments."""

import dataclasses
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import uma_eqx
import uma_eqx._heads as heads
from uma_eqx import nn, so3
from uma_eqx._config import UMAConfig
from uma_eqx._constants import CHARGE_INDEX_OFFSET, CHARGE_NUM_EMBEDDINGS, SPIN_INDEX_OFFSET, SPIN_NUM_EMBEDDINGS
from uma_eqx.nn._embedding import _is_spin

CHARGE_SPIN = (nn.TableChargeSpinEmbedding, nn.FourierChargeSpinEmbedding, nn.LinearChargeSpinEmbedding)


# --- charge/spin target --------------------------------------------------------------------


@pytest.mark.parametrize("cls", CHARGE_SPIN)
@pytest.mark.parametrize("target", ["spn", "Spin", "charges", ""])
def test_charge_spin_embedding_rejects_unknown_target(cls, target):
    # The layer raises ValueError; under the test suite's jaxtyping hook the `Literal`
    # annotation catches it first (TypeCheckError). Both name the value and the choices.
    with pytest.raises((ValueError, TypeCheckError), match=rf"'{target}'(.|\n)*'charge', 'spin'"):
        cls(target, 8, key=jax.random.key(0))
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown target '{target}'; use 'charge' or 'spin'"):
        _is_spin(cls.__name__, target)


def test_table_embedding_rows_follow_target():
    charge = nn.TableChargeSpinEmbedding("charge", 8, key=jax.random.key(0))
    spin = nn.TableChargeSpinEmbedding("spin", 8, key=jax.random.key(0))
    assert charge.weight.shape == (CHARGE_NUM_EMBEDDINGS, 8) and charge.index_offset == CHARGE_INDEX_OFFSET
    assert spin.weight.shape == (SPIN_NUM_EMBEDDINGS, 8) and spin.index_offset == SPIN_INDEX_OFFSET
    np.testing.assert_array_equal(charge(jnp.array([-100, 0, 100])), charge.weight[jnp.array([0, 100, 200])])
    np.testing.assert_array_equal(spin(jnp.array([0, 1, 100])), spin.weight[jnp.array([0, 1, 100])])


@pytest.mark.parametrize("cls", [nn.FourierChargeSpinEmbedding, nn.LinearChargeSpinEmbedding])
def test_spin_zero_rule_only_for_spin(cls):
    value = jnp.array([0, 0, 2])
    charge = cls("charge", 8, key=jax.random.key(1))
    spin = cls("spin", 8, key=jax.random.key(1))
    assert not charge.is_spin and spin.is_spin
    np.testing.assert_array_equal(charge(value)[2], spin(value)[2])
    assert not np.allclose(charge(value)[0], spin(value)[0])


def test_fourier_embedding_needs_even_channels():
    with pytest.raises(ValueError, match="channels=7 must be even"):
        nn.FourierChargeSpinEmbedding("charge", 7, key=jax.random.key(0))


# --- heads from hyperparameters --------------------------------------------------------------


def _config(**kw) -> UMAConfig:
    base = {
        "sphere_channels": 8,
        "hidden_channels": 6,
        "edge_channels": 4,
        "lmax": 1,
        "mmax": 1,
        "num_layers": 1,
        "num_distance_basis": 4,
        "cutoff": 5.0,
        "datasets": ("a", "b"),
    }
    return UMAConfig(**(base | kw))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"head_dataset_experts": (0, 1), "num_head_experts": 3},
        {"head_type": "linear_energy"},
        {"head_type": "linear_energy", "head_dataset_experts": (1, 0), "num_head_experts": 2, "direct_forces": True},
    ],
)
def test_heads_from_hyperparameters_equal_model_heads(kw):
    config = _config(**kw)
    key = jax.random.key(3)
    model = uma_eqx.UMA(config, jnp.float64, key=key)
    _, kh, kf = jax.random.split(key, 3)
    num_heads = 0 if config.head_dataset_experts is None else config.num_head_experts
    if config.head_type == "mlp_energy":
        head = heads.MLPEnergyHead(config.sphere_channels, config.hidden_channels, num_heads, jnp.float64, key=kh)
    else:
        head = heads.LinearEnergyHead(config.sphere_channels, num_heads, jnp.float64, key=kh)
    assert bool(eqx.tree_equal(head, model.energy_head))
    if config.direct_forces:
        force = heads.LinearForceHead(config.sphere_channels, jnp.float64, key=kf)
        assert bool(eqx.tree_equal(force, model.force_head))
    else:
        assert model.force_head is None


def test_head_shapes_and_routing():
    feats = jax.random.normal(jax.random.key(0), (5, 4, 8))
    plain = heads.MLPEnergyHead(8, 6, 0, key=jax.random.key(1))
    assert plain(feats, None).shape == (5,)
    per_dataset = heads.LinearEnergyHead(8, 2, key=jax.random.key(1))
    routing = nn.MoLERouting(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([2, 3]))
    e = per_dataset(feats, routing)
    w = per_dataset.layer.weights
    expected = jnp.concatenate([feats[:2, 0] @ w[0].T, feats[2:, 0] @ w[1].T])[:, 0] + per_dataset.layer.bias[0]
    np.testing.assert_allclose(e, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="MoLELinear needs expert coefficients"):
        per_dataset(feats, None)
    assert heads.LinearForceHead(8, key=jax.random.key(2))(feats).shape == (5, 3)
    with pytest.raises(ValueError, match="num_heads=-1 must be >= 0"):
        heads.LinearEnergyHead(8, -1, key=jax.random.key(1))


# --- docstrings ---------------------------------------------------------------------------


def _public(module):
    for name in getattr(module, "__all__", None) or dir(module):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__module__.startswith("uma_eqx"):
            yield obj


_HEADS = (
    heads.AbstractEnergyHead,
    heads.MLPEnergyHead,
    heads.LinearEnergyHead,
    heads.LinearForceHead,
    heads.EnergyReferences,
)
_DOCUMENTED = sorted({*_public(nn), *_public(so3), *_HEADS}, key=lambda o: (o.__module__, o.__qualname__))


def _is_generated(fn) -> bool:
    # a dataclass-generated `__init__` (no hand-written one): its code is compiled from a string
    # (unwrapped first: the test suite's jaxtyping hook wraps it in a type checker)
    return getattr(getattr(inspect.unwrap(fn), "__code__", None), "co_filename", "") == "<string>"


def _missing(doc: str | None, names, headings) -> list[str]:
    doc = doc or ""
    out = [h for h in headings if h not in doc]
    return out + [f"`{n}`" for n in names if f"`{n}`" not in doc]


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


# Not yet documented, in files outside this change (issue 17 §4.5). Strict: documenting one
# makes its entry XPASS and fail, so the entry is removed with the fix.
_NOT_YET_DOCUMENTED: set[str] = set()


def _documented_param(obj):
    name = f"{obj.__module__}.{obj.__qualname__}"
    marks = [pytest.mark.xfail(strict=True, reason="undocumented arguments")] if name in _NOT_YET_DOCUMENTED else []
    return pytest.param(obj, id=name, marks=marks)


@pytest.mark.parametrize("obj", [_documented_param(o) for o in _DOCUMENTED])
def test_public_layer_documents_every_argument(obj):
    summary = (obj.__doc__ or "").strip().splitlines()
    assert summary and summary[0], f"{obj.__qualname__} has no one-line summary"
    problems = {}
    if inspect.isfunction(obj):
        problems["function"] = _missing(obj.__doc__, _params(obj), ["**Arguments:**", "**Returns:**"])
    else:
        init = obj.__dict__.get("__init__", obj.__init__)
        if not _is_generated(init):
            problems["__init__"] = _missing(init.__doc__, _params(init), ["**Arguments:**"])
        elif dataclasses.is_dataclass(obj) and dataclasses.fields(obj):
            # a plain container: its fields are its constructor's arguments
            fields = [f.name for f in dataclasses.fields(obj)]
            heading = "**Fields:**" if "**Fields:**" in obj.__doc__ else "**Attributes:**"
            problems["fields"] = _missing(obj.__doc__, fields, [heading])
        call = obj.__dict__.get("__call__")
        if call is not None:
            problems["__call__"] = _missing(call.__doc__, _params(call), ["**Arguments:**", "**Returns:**"])
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"{obj.__qualname__}: undocumented {problems}"


def test_layers_have_no_config_constructor():
    # block layers are built from hyperparameters, never from a whole UMAConfig
    for obj in _DOCUMENTED:
        if inspect.isclass(obj) and not _is_generated(obj.__init__):
            for p in inspect.signature(obj.__init__).parameters.values():
                assert p.annotation is not UMAConfig and p.name != "config", f"{obj.__qualname__}({p.name})"


def test_s2_grid_matrices_is_public():
    to_grid, from_grid = so3.s2_grid_matrices(2)
    assert to_grid.shape == from_grid.shape == (6, 7, 9)
