"""Parity with fairchem-core 2.24 on every committed fixture, task, and dtype.

The oracle is fairchem's own `FAIRChemCalculator` output recorded by
`tests/fixtures/make_fixtures.py`; the models are the committed `.eqx` conversions (no torch).
All cases of a fixture run as ONE padded batch (mixed tasks, charges, spins, periodic and
not), so this also checks batching against fairchem's one-by-one references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uma_eqx
from _cases import case_atoms, reference, stress_offset, voigt
from conftest import FIXTURE_NAMES, FIXTURES, TOLERANCES, rel_err

_efs = jax.jit(uma_eqx.energy_forces_stress)


def _batch_outputs(name: str, dtype: str):
    ref = reference(name)
    model = uma_eqx.load(FIXTURES / f"{name}.eqx", dtype=getattr(jnp, dtype))
    cases = [c for c in ref["cases"] if dtype in c]
    atoms = [case_atoms(c) for c in cases]
    graph = uma_eqx.AtomicGraph.from_atoms(
        atoms, cutoff=model.config.cutoff, datasets=model.config.datasets,
        task_name=[c["task"] for c in cases], dtype=getattr(jnp, dtype), pad=True,
    )
    out = _efs(model, graph)
    splits = np.cumsum([len(a) for a in atoms])[:-1]
    forces = np.split(np.asarray(out["forces"])[: sum(len(a) for a in atoms)], splits)
    return ref, cases, np.asarray(out["energy"]), forces, voigt(np.asarray(out["stress"]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_parity_with_fairchem(name, dtype):
    ref, cases, energy, forces, stress = _batch_outputs(name, dtype)
    tol = TOLERANCES[dtype]
    assert len(cases) >= 5
    for i, case in enumerate(cases):
        # float32 is judged against fairchem's float64 result (the more accurate oracle): on a
        # vacuum slab with a tiny stress, fairchem's own float32 stress is 6e-5 (relative) off
        # its float64 one, so two float32 runs cannot agree to the 1e-4 bound reliably.
        r = case["float64"]
        offset = stress_offset(ref, case["task"])
        errs = {
            "energy": rel_err(energy[i], r["energy"]),
            "forces": rel_err(forces[i], r["forces"]),
            "stress": rel_err(stress[i], np.asarray(r["stress"]) - offset),
        }
        for key, err in errs.items():
            assert err <= tol[key], f"{name}/{case['name']} ({case['task']}) {dtype} {key}: rel err {err:.2e}"
