"""A fresh process's first result (issue 19 item 6): the calculator's program reaches the on-disk
compilation cache and is loaded from it, graphs are built without compiling, and host checks
refuse what the on-device check refuses."""

import json
import subprocess
import sys

import equinox as eqx
import jax
import pytest
from ase.build import bulk
from jax import monitoring

import uma_eqx

#: JAX's monitoring event for one XLA compilation (jax/_src/compiler.py).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_FRESH_PROCESS = r"""
import json, sys
import jax
from jax import monitoring
import uma_eqx
from uma_eqx.calculator import UMACalculator
from ase.build import bulk

uma_eqx.enable_compilation_cache(sys.argv[1])
model = uma_eqx.default_model()
events = []
monitoring.register_event_duration_secs_listener(lambda event, seconds, **_: events.append(event))
atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
atoms.rattle(0.05, seed=0)
energy = UMACalculator(model).get_potential_energy(atoms)
first = list(events)
jax.clear_caches()  # the next call finds nothing in memory: only the on-disk cache can serve it
events.clear()
again = UMACalculator(model).get_potential_energy(atoms)
print(json.dumps({"energy": energy, "again": again, "first": first, "second": list(events),
                  "torch_imported": "torch" in sys.modules}))
"""


def test_calculator_program_is_kept_and_loaded_by_the_compilation_cache(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert any(p.name.startswith("jit_energy_forces_stress") for p in tmp_path.iterdir())
    # first call: the model's program and the experts merge, nothing else (no per-shape small programs)
    assert result["first"].count(BACKEND_COMPILE_EVENT) <= 2
    assert result["second"].count("/jax/compilation_cache/compile_time_saved_sec") >= 1  # loaded from disk
    assert result["again"] == result["energy"]
    assert not result["torch_imported"]  # vesin's import does not pull in torch


def test_building_and_padding_a_graph_compiles_nothing():
    model = uma_eqx.default_model()
    compiles = []

    def listener(event: str, seconds: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(seconds)

    atoms = bulk("Cu", "fcc", a=3.61).repeat((3, 2, 1))  # a size no other test pads
    monitoring.register_event_duration_secs_listener(listener)
    try:
        graph = uma_eqx.AtomicGraph.for_model(model, atoms, pad=True)
        graph = graph.host_checked(model.config.max_num_elements, len(model.config.datasets))
        uma_eqx.pad_graph(graph, graph.num_atoms + 3, graph.num_edges + 5, graph.num_systems + 1)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_host_checked_refuses_what_checked_refuses():
    model = uma_eqx.default_model()
    sizes = (model.config.max_num_elements, len(model.config.datasets))
    graph = uma_eqx.AtomicGraph.for_model(model, bulk("Cu", "fcc", a=3.6), pad=True)
    assert graph.host_checked(*sizes).checked_for == sizes
    bad = eqx.tree_at(lambda g: g.atomic_numbers, graph, graph.atomic_numbers.at[0].set(sizes[0]))
    with pytest.raises(ValueError, match="atomic number is outside"):  # checked()'s message (test_validation)
        bad.host_checked(*sizes)
    bad = eqx.tree_at(lambda g: g.edge_index, graph, graph.edge_index.at[0, 0].set(-1))
    with pytest.raises(ValueError, match="edge_index"):
        bad.host_checked(*sizes)
    with pytest.raises(ValueError, match="needs concrete arrays"):
        jax.jit(lambda g: g.host_checked(*sizes))(graph)
