#!/usr/bin/env python
"""Deterministic, offline EMT dataset generator for the small built-in UMA-eqx model.

Generates small periodic structures of the seven EMT metals (Cu, Ag, Au, Ni, Pd,
Pt, Al), labels them with ASE's EMT calculator (energy, forces, stress) and
writes ``train.extxyz`` / ``val.extxyz`` / ``test.extxyz`` plus ``summary.json``.

Usage::

    python data_gen/make_emt_dataset.py --out DIR [--seed 0] [--size small|full]

Reruns with the same ``--seed``/``--size`` (and the same ASE / NumPy versions)
reproduce every output file byte for byte: all randomness comes from a single
``np.random.default_rng(seed)``; where ASE needs its own generator (Langevin
MD, Maxwell-Boltzmann velocities) a ``np.random.RandomState`` seeded from that
generator is passed explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import ase
import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.neighborlist import neighbor_list

try:  # ase >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta as _thermalize
except ImportError:  # older ase
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def _thermalize(atoms, temperature_K, *, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


ELEMENTS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")

# Equilibrium fcc lattice constants (Angstrom) of ASE's EMT potential, found by a
# fine 1-D scan of the primitive-cell energy (ase 3.29).  These are slightly
# smaller than the experimental values in ase.data.reference_states, so
# centring the sampling on them puts the 0.94-1.06 scan around the EMT minimum.
EMT_LATTICE = {
    "Cu": 3.5898,
    "Ag": 4.0636,
    "Au": 4.0562,
    "Ni": 3.4871,
    "Pd": 3.8787,
    "Pt": 3.9218,
    "Al": 3.9943,
}

CATEGORIES = (
    "bulk",
    "strained",
    "rattled",
    "vacancy",
    "surface",
    "alloy_binary",
    "alloy_ternary",
    "md",
)

# Number of structures (or, for "md", trajectories x snapshots) per category.
SIZES = {
    "full": {
        "bulk_scales": 11,  # 7 elements x 3 cells x 11 scales = 231
        "strained": 180,
        "rattled": 180,
        "vacancy": 120,
        "surface": 160,
        "alloy_binary": 220,
        "alloy_ternary": 150,
        "md_trajectories": 36,  # x 3 temperatures cycled, x md_snapshots
        "md_snapshots": 7,
    },
    "small": {
        "bulk_scales": 2,  # 7 x 3 x 2 = 42
        "strained": 16,
        "rattled": 16,
        "vacancy": 10,
        "surface": 16,
        "alloy_binary": 16,
        "alloy_ternary": 10,
        "md_trajectories": 6,
        "md_snapshots": 4,
    },
}

MD_TEMPERATURES_K = (300.0, 800.0, 1500.0)
MD_TIMESTEP_FS = 2.0
MD_FRICTION = 0.02 / units.fs  # 20 ps^-1 (strong coupling: short runs)
MD_EQUIL_STEPS = 20
MD_INTERVAL = 10

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


# ----------------------------------------------------------------------------
# Cell builders
# ----------------------------------------------------------------------------


def fcc_cell(symbol: str, a: float, kind: str) -> Atoms:
    """fcc cell of ``symbol`` with lattice constant ``a``.

    kind: prim1 (1 atom), conv4 (4), prim8 (2x2x2 primitive, 8),
    conv8 (2x1x1 conventional, 8), conv16 (2x2x1 conventional, 16),
    conv32 (2x2x2 conventional, 32).
    """
    if kind == "prim1":
        at = bulk(symbol, "fcc", a=a)
    elif kind == "conv4":
        at = bulk(symbol, "fcc", a=a, cubic=True)
    elif kind == "prim8":
        at = bulk(symbol, "fcc", a=a).repeat((2, 2, 2))
    elif kind == "conv8":
        at = bulk(symbol, "fcc", a=a, cubic=True).repeat((2, 1, 1))
    elif kind == "conv16":
        at = bulk(symbol, "fcc", a=a, cubic=True).repeat((2, 2, 1))
    elif kind == "conv32":
        at = bulk(symbol, "fcc", a=a, cubic=True).repeat((2, 2, 2))
    else:
        raise ValueError(kind)
    at.pbc = True
    return at


def choose(rng: np.random.Generator, options, probs=None):
    idx = rng.choice(len(options), p=probs)
    return options[int(idx)]


# Rattled structures whose closest pair is below this fraction of the fcc
# nearest-neighbour distance a/sqrt(2) are redrawn: EMT is very stiff at short
# range and such frames give 20-80 eV/A force outliers that would dominate the
# training loss of a small model.
MIN_DIST_FRACTION = 0.8


def min_pair_distance(atoms: Atoms, cutoff: float) -> float:
    """Smallest interatomic distance (periodic images included) below cutoff."""
    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else float("inf")


def rattle(rng: np.random.Generator, atoms: Atoms, stdev: float, a: float | None = None) -> None:
    """Gaussian rattle (per Cartesian component) drawn from ``rng``.

    If ``a`` (a lattice constant) is given, draws that bring any pair closer
    than MIN_DIST_FRACTION * a / sqrt(2) are rejected and redrawn (the
    standard deviation is shrunk by 10% every 10 rejections); this stays
    deterministic because every draw comes from ``rng``.
    """
    pos0 = atoms.positions.copy()
    dmin = None if a is None else MIN_DIST_FRACTION * a / np.sqrt(2.0)
    for attempt in range(200):
        atoms.positions = pos0 + rng.normal(0.0, stdev, size=(len(atoms), 3))
        if dmin is None or min_pair_distance(atoms, dmin) >= dmin:
            return
        if attempt % 10 == 9:
            stdev *= 0.9
    atoms.positions = pos0


def random_symmetric_strain(rng: np.random.Generator, max_strain: float) -> np.ndarray:
    eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    return np.clip(eps, -max_strain, max_strain)


def apply_strain(atoms: Atoms, eps: np.ndarray) -> None:
    cell = np.asarray(atoms.cell)
    atoms.set_cell(cell @ (np.eye(3) + eps), scale_atoms=True)


def vegard_a(symbols) -> float:
    counts = Counter(symbols)
    n = sum(counts.values())
    return sum(EMT_LATTICE[s] * c for s, c in counts.items()) / n


def random_alloy_symbols(rng: np.random.Generator, n: int, elements) -> list[str]:
    """Random substitution with every chosen element present at least once."""
    k = len(elements)
    # Random composition from a Dirichlet draw, then guarantee each species.
    frac = rng.dirichlet(np.ones(k))
    counts = np.ones(k, dtype=int)
    remaining = n - k
    extra = rng.multinomial(remaining, frac)
    counts += extra
    syms = [el for el, c in zip(elements, counts) for _ in range(int(c))]
    perm = rng.permutation(n)
    return [syms[i] for i in perm]


# ----------------------------------------------------------------------------
# Category generators. Each returns a list of groups; a group is a list of
# (Atoms, category) frames that must land in the same split (one group per
# independent structure; one group per MD trajectory).
# ----------------------------------------------------------------------------


def gen_bulk(rng, cfg):
    groups = []
    n = cfg["bulk_scales"]
    # Evenly spaced scale factors of the EMT lattice constant in [0.94, 1.06]
    # (n >= 3); the tiny test set uses two off-equilibrium points.
    scales = np.linspace(0.94, 1.06, n) if n >= 3 else [0.97, 1.03][:n]
    for el in ELEMENTS:
        for kind in ("prim1", "conv4", "prim8"):
            for s in scales:
                at = fcc_cell(el, EMT_LATTICE[el] * float(s), kind)
                groups.append([(at, "bulk")])
    return groups


def gen_strained(rng, cfg):
    kinds = ("prim1", "conv4", "prim8", "conv8", "conv16")
    probs = (0.1, 0.3, 0.25, 0.2, 0.15)
    groups = []
    for _ in range(cfg["strained"]):
        el = choose(rng, ELEMENTS)
        kind = choose(rng, kinds, probs)
        a = EMT_LATTICE[el] * rng.uniform(0.97, 1.03)
        at = fcc_cell(el, a, kind)
        apply_strain(at, random_symmetric_strain(rng, 0.04))
        rattle(rng, at, rng.uniform(0.03, 0.1), a)
        groups.append([(at, "strained")])
    return groups


def gen_rattled(rng, cfg):
    kinds = ("conv4", "prim8", "conv8", "conv16", "conv32")
    probs = (0.25, 0.3, 0.2, 0.2, 0.05)
    groups = []
    for _ in range(cfg["rattled"]):
        el = choose(rng, ELEMENTS)
        kind = choose(rng, kinds, probs)
        a = EMT_LATTICE[el] * rng.uniform(0.97, 1.03)
        at = fcc_cell(el, a, kind)
        rattle(rng, at, rng.uniform(0.05, 0.2), a)
        groups.append([(at, "rattled")])
    return groups


def gen_vacancy(rng, cfg):
    kinds = ("prim8", "conv8", "conv16", "conv32")
    probs = (0.45, 0.25, 0.2, 0.1)
    groups = []
    for _ in range(cfg["vacancy"]):
        el = choose(rng, ELEMENTS)
        kind = choose(rng, kinds, probs)
        a = EMT_LATTICE[el] * rng.uniform(0.98, 1.02)
        at = fcc_cell(el, a, kind)
        del at[int(rng.integers(len(at)))]
        rattle(rng, at, rng.uniform(0.02, 0.1), a)
        groups.append([(at, "vacancy")])
    return groups


def gen_surface(rng, cfg):
    # (builder, size); all <= 16 atoms.
    slabs = (
        (fcc111, (1, 1, 4)),
        (fcc111, (1, 1, 6)),
        (fcc111, (2, 2, 3)),
        (fcc111, (2, 2, 4)),
        (fcc100, (1, 1, 4)),
        (fcc100, (1, 1, 6)),
        (fcc100, (2, 2, 3)),
        (fcc100, (2, 2, 4)),
    )
    groups = []
    for _ in range(cfg["surface"]):
        el = choose(rng, ELEMENTS)
        builder, size = slabs[int(rng.integers(len(slabs)))]
        a = EMT_LATTICE[el] * rng.uniform(0.98, 1.02)
        at = builder(el, size=size, a=a, vacuum=6.0, periodic=True)
        at.pbc = True
        # One slab in four is a random binary surface alloy.
        if rng.uniform() < 0.25:
            other = choose(rng, [e for e in ELEMENTS if e != el])
            mask = rng.uniform(size=len(at)) < rng.uniform(0.2, 0.5)
            syms = at.get_chemical_symbols()
            for j in np.nonzero(mask)[0]:
                syms[int(j)] = other
            at.set_chemical_symbols(syms)
        rattle(rng, at, rng.uniform(0.02, 0.1), a)
        groups.append([(at, "surface")])
    return groups


def _alloy(rng, n_elem, kinds, probs, category):
    els = [ELEMENTS[int(i)] for i in rng.choice(len(ELEMENTS), size=n_elem, replace=False)]
    kind = choose(rng, kinds, probs)
    at = fcc_cell("Cu", 1.0, kind)  # placeholder species / lattice constant
    syms = random_alloy_symbols(rng, len(at), els)
    a = vegard_a(syms) * rng.uniform(0.97, 1.03)
    at = fcc_cell("Cu", a, kind)
    at.set_chemical_symbols(syms)
    if rng.uniform() < 0.3:
        apply_strain(at, random_symmetric_strain(rng, 0.03))
    rattle(rng, at, rng.uniform(0.02, 0.12), a)
    return [(at, category)]


def gen_alloy_binary(rng, cfg):
    kinds = ("conv4", "prim8", "conv8", "conv16")
    probs = (0.25, 0.3, 0.25, 0.2)
    return [_alloy(rng, 2, kinds, probs, "alloy_binary") for _ in range(cfg["alloy_binary"])]


def gen_alloy_ternary(rng, cfg):
    kinds = ("prim8", "conv8", "conv16", "conv32")
    probs = (0.35, 0.3, 0.3, 0.05)
    return [_alloy(rng, 3, kinds, probs, "alloy_ternary") for _ in range(cfg["alloy_ternary"])]


def gen_md(rng, cfg):
    kinds = ("conv4", "prim8", "conv8", "conv16")
    probs = (0.2, 0.3, 0.25, 0.25)
    groups = []
    for t in range(cfg["md_trajectories"]):
        temp = MD_TEMPERATURES_K[t % len(MD_TEMPERATURES_K)]
        kind = choose(rng, kinds, probs)
        n_elem = choose(rng, (1, 2, 3), (0.5, 0.35, 0.15))
        if n_elem == 1:
            el = choose(rng, ELEMENTS)
            at = fcc_cell(el, EMT_LATTICE[el], kind)
        else:
            els = [ELEMENTS[int(i)] for i in rng.choice(len(ELEMENTS), size=n_elem, replace=False)]
            n = len(fcc_cell("Cu", 1.0, kind))
            syms = random_alloy_symbols(rng, n, els)
            at = fcc_cell("Cu", vegard_a(syms), kind)
            at.set_chemical_symbols(syms)
        # Slight thermal expansion at high T.
        at.set_cell(np.asarray(at.cell) * (1.0 + 1.0e-5 * temp), scale_atoms=True)
        rs = np.random.RandomState(int(rng.integers(2**31 - 1)))
        _thermalize(at, temp, rng=rs)
        at.calc = EMT()
        dyn = Langevin(
            at,
            timestep=MD_TIMESTEP_FS * units.fs,
            temperature_K=temp,
            friction=MD_FRICTION,
            fixcm=False,
            rng=rs,
        )
        frames = []
        dyn.run(MD_EQUIL_STEPS)
        for k in range(cfg["md_snapshots"]):
            if k > 0:
                dyn.run(MD_INTERVAL)
            snap = Atoms(
                symbols=at.get_chemical_symbols(),
                positions=at.get_positions(wrap=True),
                cell=np.asarray(at.cell),
                pbc=True,
            )
            snap.info["md_temperature_K"] = temp
            snap.info["md_step"] = MD_EQUIL_STEPS + k * MD_INTERVAL
            snap.info["md_trajectory"] = t
            frames.append((snap, "md"))
        groups.append(frames)
    return groups


GENERATORS = {
    "bulk": gen_bulk,
    "strained": gen_strained,
    "rattled": gen_rattled,
    "vacancy": gen_vacancy,
    "surface": gen_surface,
    "alloy_binary": gen_alloy_binary,
    "alloy_ternary": gen_alloy_ternary,
    "md": gen_md,
}


# ----------------------------------------------------------------------------
# Labelling, splitting, writing
# ----------------------------------------------------------------------------


def label(atoms: Atoms, category: str) -> Atoms:
    """Return a clean copy of ``atoms`` carrying EMT energy/forces/stress."""
    out = Atoms(
        symbols=atoms.get_chemical_symbols(),
        positions=atoms.get_positions(wrap=True),
        cell=np.asarray(atoms.cell),
        pbc=True,
    )
    calc = EMT()
    out.calc = calc
    energy = float(out.get_potential_energy())
    forces = np.array(out.get_forces())
    stress = np.array(out.get_stress(voigt=True))
    out.calc = None
    extra = {k: v for k, v in atoms.info.items() if k.startswith("md_")}
    out.info = {"task": "omat", "charge": 0, "spin": 0, "category": category}
    out.info.update(extra)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def split_groups(rng, groups_by_cat):
    """Stratified 80/10/10 split of groups (structures / MD trajectories)."""
    splits = {"train": [], "val": [], "test": []}
    for cat in CATEGORIES:
        groups = groups_by_cat[cat]
        n = len(groups)
        order = rng.permutation(n)
        n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n))) if n >= 3 else 0
        n_test = max(1, int(round(SPLIT_FRACTIONS[2] * n))) if n >= 3 else 0
        n_train = n - n_val - n_test
        for rank, gi in enumerate(order):
            name = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
            splits[name].extend(groups[int(gi)])
    # Final frame-level shuffle within each split (groups already disjoint).
    for name in splits:
        perm = rng.permutation(len(splits[name]))
        splits[name] = [splits[name][int(i)] for i in perm]
    return splits


def _rng_range(values):
    if len(values) == 0:
        return None
    values = np.asarray(values, dtype=float)
    return {
        "min": round(float(values.min()), 6),
        "max": round(float(values.max()), 6),
        "mean": round(float(values.mean()), 6),
    }


def split_summary(frames):
    cats = Counter(f.info["category"] for f in frames)
    elems = Counter(s for f in frames for s in f.get_chemical_symbols())
    natoms = [len(f) for f in frames]
    e_pa = [f.get_potential_energy() / len(f) for f in frames]
    fnorm = np.concatenate([np.linalg.norm(f.get_forces(), axis=1) for f in frames]) if frames else []
    fmax = [float(np.linalg.norm(f.get_forces(), axis=1).max()) for f in frames]
    stress = np.concatenate([f.get_stress() for f in frames]) if frames else []
    return {
        "n_structures": len(frames),
        "n_atoms": int(sum(natoms)),
        "categories": {c: cats.get(c, 0) for c in CATEGORIES},
        "elements": {e: elems.get(e, 0) for e in ELEMENTS},
        "natoms_per_structure": _rng_range(natoms),
        "energy_per_atom_eV": _rng_range(e_pa),
        "force_norm_eV_per_A": _rng_range(fnorm),
        "max_force_per_structure_eV_per_A": _rng_range(fmax),
        "stress_component_eV_per_A3": _rng_range(stress),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    cfg = SIZES[args.size]
    rng = np.random.default_rng(args.seed)

    groups_by_cat = {}
    for cat in CATEGORIES:
        raw = GENERATORS[cat](rng, cfg)
        groups_by_cat[cat] = [[label(at, c) for at, c in g] for g in raw]

    splits = split_groups(rng, groups_by_cat)

    os.makedirs(args.out, exist_ok=True)
    for name in ("train", "val", "test"):
        path = os.path.join(args.out, f"{name}.extxyz")
        if os.path.exists(path):
            os.remove(path)
        ase.io.write(path, splits[name], format="extxyz")

    all_frames = [f for name in ("train", "val", "test") for f in splits[name]]
    summary = {
        "generator": "data_gen/make_emt_dataset.py",
        "calculator": "ase.calculators.emt.EMT",
        "seed": args.seed,
        "size": args.size,
        "ase_version": ase.__version__,
        "numpy_version": np.__version__,
        "elements": list(ELEMENTS),
        "emt_lattice_constants_A": EMT_LATTICE,
        "split_fractions": list(SPLIT_FRACTIONS),
        "split_unit": "structure (MD: whole trajectory), stratified by category",
        "rattle_min_distance_fraction_of_nn": MIN_DIST_FRACTION,
        "md": {
            "temperatures_K": list(MD_TEMPERATURES_K),
            "timestep_fs": MD_TIMESTEP_FS,
            "friction_per_fs": MD_FRICTION * units.fs,
            "equilibration_steps": MD_EQUIL_STEPS,
            "snapshot_interval_steps": MD_INTERVAL,
            "snapshots_per_trajectory": cfg["md_snapshots"],
            "trajectories": cfg["md_trajectories"],
        },
        "total": split_summary(all_frames),
        "splits": {name: split_summary(splits[name]) for name in ("train", "val", "test")},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")

    dt = time.perf_counter() - t0
    tot = summary["total"]
    print(
        f"wrote {tot['n_structures']} structures ({tot['n_atoms']} atoms) to {args.out} "
        f"[train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])}] "
        f"in {dt:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
