"""JAX-MD integration: energy functions equal the host-graph model; integrators and drivers run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from conftest import rel_err

import uma_eqx
from uma_eqx import jax_md as ujmd

space = pytest.importorskip("jax_md.space")
simulate = pytest.importorskip("jax_md.simulate")
quantity = pytest.importorskip("jax_md.quantity")
minimize = pytest.importorskip("jax_md.minimize")

TASK = "omat"


@pytest.fixture(scope="module")
def model64():
    return uma_eqx.load(uma_eqx._default.DEFAULT_MODEL, dtype=jnp.float64)


def _skewed_cu(seed=1):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell[:] @ np.array([[1.0, 0.08, 0.0], [0.0, 1.0, 0.05], [0.03, 0.0, 1.0]]), scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


def _host(model, atoms):
    cfg = model.config
    graph = uma_eqx.AtomicGraph.from_atoms(
        atoms, cutoff=cfg.cutoff, datasets=cfg.datasets, task_name=TASK, dtype=model.dtype
    )
    return uma_eqx.energy_forces_stress(model, graph)


@pytest.mark.parametrize("fractional, method", [(False, "auto"), (True, "auto"), (False, "cell_list")])
def test_energy_forces_stress_equal_host_graph(model64, fractional, method):
    """Triclinic cell narrower than 2x the cutoff: many images, all found (by either search)."""
    atoms = _skewed_cu()
    ref = _host(model64, atoms)
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(
        model64, atoms, task_name=TASK, fractional_coordinates=fractional, neighbor_method=method
    )
    box = jnp.asarray(ujmd.box_from_atoms(atoms))
    R = jnp.asarray(atoms.get_scaled_positions() if fractional else atoms.positions)
    nbrs = neighbor_fn.allocate(R)
    energy = energy_fn(R, neighbor=nbrs)
    assert rel_err(energy, ref["energy"][0]) < 1e-12
    # JAX-MD's stress is -(1/V) dU/d(strain): the opposite sign of ours (fairchem's).
    stress = quantity.stress(energy_fn, R, box, neighbor=nbrs)
    assert rel_err(-stress, ref["stress"][0]) < 1e-10
    # Isotropic (scalar) perturbation, as npt_nose_hoover uses: P = -tr(sigma)/3.
    pressure = quantity.pressure(energy_fn, R, box, neighbor=nbrs)
    assert rel_err(pressure, -np.trace(np.asarray(ref["stress"][0])) / 3) < 1e-10
    grad = jax.grad(lambda r: energy_fn(r, neighbor=nbrs))(R)
    # JAX-MD convention: also for fractional R, -grad is the Cartesian force.
    assert rel_err(-grad, ref["forces"]) < 1e-10


def test_non_periodic_and_slab(model64):
    mol = molecule("H2O")
    mol.set_atomic_numbers([29, 47, 47])  # the default model's elements
    mol.positions *= 1.6
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model64, mol, task_name=TASK)
    R = jnp.asarray(mol.positions)
    assert rel_err(energy_fn(R, neighbor=neighbor_fn.allocate(R)), _host(model64, mol)["energy"][0]) < 1e-12

    slab = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    slab.center(vacuum=5.0, axis=2)
    slab.pbc = (True, True, False)
    slab.rattle(0.05, seed=2)
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model64, slab, task_name=TASK)
    R = jnp.asarray(slab.positions)
    assert rel_err(energy_fn(R, neighbor=neighbor_fn.allocate(R)), _host(model64, slab)["energy"][0]) < 1e-12
    with pytest.raises(ValueError, match="fractional_coordinates=True needs a periodic"):
        ujmd.energy_and_neighbor_fns(model64, slab, task_name=TASK, fractional_coordinates=True)


def test_bad_input(model64):
    atoms = _skewed_cu()
    with pytest.raises(ValueError, match="unknown task_name"):
        ujmd.energy_and_neighbor_fns(model64, atoms, task_name="nope")
    bad = atoms.copy()
    bad.numbers[0] = 0
    with pytest.raises(ValueError, match=r"atomic number\(s\) 0 \(X\)"):
        ujmd.energy_and_neighbor_fns(model64, bad, task_name=TASK)
    lone = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="single non-periodic atom"):
        ujmd.energy_and_neighbor_fns(model64, lone, task_name=TASK)
    _, neighbor_fn = ujmd.energy_and_neighbor_fns(model64, atoms, task_name=TASK)
    R = np.array(atoms.positions)
    R[1, 2] = np.nan
    with pytest.raises(ValueError, match="atom 1 is not finite"):
        neighbor_fn.allocate(jnp.asarray(R))


def _md_setup(model, fractional=False, **kwargs):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.03, seed=3)
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(
        model, atoms, task_name=TASK, fractional_coordinates=fractional, **kwargs
    )
    box = jnp.asarray(ujmd.box_from_atoms(atoms), model.dtype)
    _, shift_fn = space.periodic_general(box, fractional_coordinates=fractional)
    R = jnp.asarray(atoms.get_scaled_positions() if fractional else atoms.positions, model.dtype)
    mass = jnp.asarray(atoms.get_masses(), model.dtype)[:, None]
    return atoms, energy_fn, neighbor_fn, shift_fn, box, R, mass


def _total_energy(energy_fn):
    def observe(state, nbrs):
        kinetic = quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        return energy_fn(state.position, neighbor=nbrs) + kinetic

    return observe


@pytest.mark.parametrize("dtype, bound", [(jnp.float64, 5e-5), (jnp.float32, 2.5e-4)])
def test_nve_energy_conservation(dtype, bound):
    """NVE, 8 Cu atoms, 300 K start, 1 fs, 1000 steps: |E_tot(t) - E_tot(0)| per atom stays
    below `bound` eV (measured: see docs/md.md)."""
    model = uma_eqx.load(uma_eqx._default.DEFAULT_MODEL, dtype=dtype)
    atoms, energy_fn, neighbor_fn, shift_fn, _, R, mass = _md_setup(model)
    init, apply = simulate.nve(energy_fn, shift_fn, 1.0 * ujmd.FEMTOSECOND)
    nbrs = neighbor_fn.allocate(R)
    state = init(jax.random.PRNGKey(0), R, kT=300 * ujmd.BOLTZMANN, mass=mass, neighbor=nbrs)
    state, nbrs, obs = ujmd.run(
        lambda s, n: apply(s, neighbor=n),
        state,
        nbrs,
        neighbor_fn,
        1000,
        steps_per_chunk=500,
        observe=_total_energy(energy_fn),
    )
    energy = np.concatenate([np.asarray(o, np.float64) for o in obs])
    deviation = np.max(np.abs(energy - energy[0])) / len(atoms)
    print(f"NVE {jnp.dtype(dtype).name}: max |E-E0| per atom = {deviation:.2e} eV")
    assert np.all(np.isfinite(energy)) and deviation < bound


def test_thermostats_barostat_and_fire(model64):
    atoms, energy_fn, neighbor_fn, shift_fn, box, R, mass = _md_setup(model64)
    nbrs = neighbor_fn.allocate(R)
    kT = 300 * ujmd.BOLTZMANN
    dt = 1.0 * ujmd.FEMTOSECOND
    for make in (
        lambda: simulate.nvt_nose_hoover(energy_fn, shift_fn, dt, kT),
        lambda: simulate.nvt_langevin(energy_fn, shift_fn, dt, kT, gamma=0.1),
    ):
        init, apply = make()
        state = init(jax.random.PRNGKey(1), R, mass=mass, neighbor=nbrs)
        state, _, _ = ujmd.run(
            lambda s, n, apply=apply: apply(s, neighbor=n), state, nbrs, neighbor_fn, 20, steps_per_chunk=10
        )
        assert np.all(np.isfinite(np.asarray(state.position)))

    # NPT needs fractional coordinates and the box passed through.
    atoms, energy_fn, neighbor_fn, shift_fn, box, Rf, mass = _md_setup(model64, fractional=True)
    init, apply = simulate.npt_nose_hoover(energy_fn, shift_fn, dt, pressure=0.0, kT=kT)
    nbrs = neighbor_fn.allocate(Rf)
    state = init(jax.random.PRNGKey(2), Rf, box=box, mass=mass, neighbor=nbrs)
    state, _, _ = ujmd.run(
        lambda s, n: apply(s, neighbor=n), state, nbrs, neighbor_fn, 20, steps_per_chunk=10, box_fn=simulate.npt_box
    )
    new_box = np.asarray(simulate.npt_box(state))
    assert np.all(np.isfinite(new_box)) and not np.allclose(new_box, np.asarray(box))

    # FIRE lowers the maximum force.
    atoms, energy_fn, neighbor_fn, shift_fn, box, R, mass = _md_setup(model64)
    init, apply = minimize.fire_descent(energy_fn, shift_fn, dt_start=0.1, dt_max=0.4)
    nbrs = neighbor_fn.allocate(R)
    state = init(R, mass=mass, neighbor=nbrs)
    force0 = np.abs(np.asarray(state.force)).max()
    state, _, _ = ujmd.run(lambda s, n: apply(s, neighbor=n), state, nbrs, neighbor_fn, 60, steps_per_chunk=60)
    assert np.abs(np.asarray(state.force)).max() < 0.5 * force0


def test_run_reallocates_on_overflow(model64):
    """A buffer with no head-room overflows as hot atoms move (small skin, many rebuilds); the
    driver reallocates and reruns the chunk, giving the trajectory of a run that never overflowed."""
    results = []
    for multiplier in (1.0, 3.0):
        _, energy_fn, neighbor_fn, shift_fn, _, R, mass = _md_setup(model64, capacity_multiplier=multiplier, skin=0.05)
        init, apply = simulate.nve(energy_fn, shift_fn, 2.0 * ujmd.FEMTOSECOND)
        nbrs = neighbor_fn.allocate(R)
        state = init(jax.random.PRNGKey(4), R, kT=3000 * ujmd.BOLTZMANN, mass=mass, neighbor=nbrs)
        capacity0 = nbrs.capacity

        # the energy observed every step (energy_fn refuses an overflowed list: the driver must
        # not observe the step that overflowed) and once per chunk
        def energy(s, n, energy_fn=energy_fn):
            return energy_fn(s.position, neighbor=n)

        def step(s, n, apply=apply):
            return apply(s, neighbor=n)

        _, _, last = ujmd.run(step, state, nbrs, neighbor_fn, 40, steps_per_chunk=10, observe=energy, observe_last=True)
        state, nbrs, every = ujmd.run(step, state, nbrs, neighbor_fn, 40, steps_per_chunk=10, observe=energy)
        results.append((np.asarray(state.position), capacity0, nbrs.capacity, np.concatenate(every), np.stack(last)))
    (pos_tight, cap0, cap1, every_tight, last_tight), (pos_roomy, _, _, every_roomy, last_roomy) = results
    assert cap1 > cap0  # it did reallocate
    np.testing.assert_allclose(pos_tight, pos_roomy, atol=1e-10)
    assert every_tight.shape == (40,) and last_tight.shape == (4,)
    np.testing.assert_allclose(every_tight, every_roomy, rtol=1e-10)
    np.testing.assert_allclose(last_tight, every_roomy[9::10], rtol=1e-10)


def test_minimum_image_mode_and_partial_chunks(model64):
    """A cell wider than 2 (cutoff + skin) uses the one-image search; a last chunk shorter than
    `steps_per_chunk` runs exactly the remaining steps."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=5)
    energy_fn, neighbor_fn = ujmd.energy_and_neighbor_fns(model64, atoms, task_name=TASK, skin=0.3)
    R = jnp.asarray(atoms.positions)
    nbrs = neighbor_fn.allocate(R)
    assert nbrs.minimum_image
    assert rel_err(energy_fn(R, neighbor=nbrs), _host(model64, atoms)["energy"][0]) < 1e-12

    atoms, energy_fn, neighbor_fn, shift_fn, _, R, mass = _md_setup(model64)
    init, apply = simulate.nve(energy_fn, shift_fn, 1.0 * ujmd.FEMTOSECOND)
    nbrs = neighbor_fn.allocate(R)
    state0 = init(jax.random.PRNGKey(0), R, kT=300 * ujmd.BOLTZMANN, mass=mass, neighbor=nbrs)
    step = lambda s, n: apply(s, neighbor=n)  # noqa: E731
    counter = lambda s, n: jnp.ones(())  # noqa: E731
    a, _, obs_a = ujmd.run(step, state0, nbrs, neighbor_fn, 7, steps_per_chunk=4, observe=counter)
    b, _, obs_b = ujmd.run(step, state0, nbrs, neighbor_fn, 7, steps_per_chunk=7, observe=counter)
    assert [len(o) for o in obs_a] == [4, 3] and [len(o) for o in obs_b] == [7]
    np.testing.assert_allclose(np.asarray(a.position), np.asarray(b.position), atol=1e-12)


def test_run_stops_on_nan(model64):
    atoms, energy_fn, neighbor_fn, shift_fn, box, R, mass = _md_setup(model64)
    init, apply = simulate.nve(energy_fn, shift_fn, 1.0 * ujmd.FEMTOSECOND)
    nbrs = neighbor_fn.allocate(R)
    state = init(jax.random.PRNGKey(0), R, kT=0.02, mass=mass, neighbor=nbrs)
    state = state.set(momentum=state.momentum.at[0, 0].set(jnp.nan))
    with pytest.raises(FloatingPointError, match="NaN/inf between steps 0 and 5"):
        ujmd.run(lambda s, n: apply(s, neighbor=n), state, nbrs, neighbor_fn, 10, steps_per_chunk=5)
