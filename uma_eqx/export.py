"""Engine-facing energy, forces and virial (LAMMPS conventions), and portable `jax.export` artifacts.

[`energy_forces_virial`][uma_eqx.export.energy_forces_virial] is the one function that MD
engines call: it returns the energy, the forces, the virial and their per-atom split, with
energies summed over the *owned* atoms of a graph (`atom_mask`) while every atom — owned or
ghost — takes part in message passing and receives a force. [`export`][uma_eqx.export.export]
serialises it with `jax.export`, so that a host without Python model code (a C++ engine, or
Python with only `jax`) can run the model; the calling convention is in `docs/engines.md`.
"""

import contextlib
import dataclasses
import json
import pathlib
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._constants import CHARGE_RANGE, SPIN_RANGE
from ._graph import AtomicGraph
from ._potential import UMA, merge_experts_for
from ._settings import DEFAULT_SETTINGS, ExecutionSettings

#: Settings of programs with a symbolic edge count: one chunk of all edges (the plain
#: program), and the backward pass recomputes the SO(2) convolutions (residual budget 0). The
#: chunk layout and the residual budget are decided with Python arithmetic on the edge count,
#: which a symbolic count can answer only for these choices. Fixed sizes use `DEFAULT_SETTINGS`.
EXPORT_SETTINGS = ExecutionSettings(edge_chunk_size=None, residual_budget_bytes=0)
#: Fewest edges a symbolic-size artifact takes (pad with index -1): the plain program takes
#: `max(1, edges)` edges per chunk, which a symbolic count must decide.
MIN_EDGES = 2
#: Version of the artifact layout (inputs, outputs, metadata keys) described in `docs/engines.md`.
EXPORT_FORMAT_VERSION = 1
#: `format` value of the metadata sidecar.
EXPORT_FORMAT = "uma_eqx.jaxexport"
#: Platforms an artifact is lowered for by default (jax.export platform names).
DEFAULT_PLATFORMS = ("cpu", "cuda")
#: Virial components in LAMMPS order (`fix external`, `compute stress/atom`): xx yy zz xy xz yz.
VOIGT_ROWS = (0, 1, 2, 0, 0, 1)
VOIGT_COLS = (0, 1, 2, 1, 2, 2)
#: Neighbour-list kinds an exported function takes: every directed pair, or each pair once.
NeighborListKind = Literal["full", "half"]


def voigt(virial: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch 6"]:
    """A virial tensor as LAMMPS' 6 components `xx yy zz xy xz yz` (of its symmetric part)."""
    sym = 0.5 * (virial + jnp.swapaxes(virial, -1, -2))
    return sym[..., VOIGT_ROWS, VOIGT_COLS]


def cartesian_shifts(graph: AtomicGraph) -> AtomicGraph:
    """The same graph with each edge's periodic shift in Å and identity cells.

    Edge vectors `r_j - r_i + S_e H` are unchanged; afterwards `edge_shift[e]` is the shift
    vector `S_e H` itself, so that the gradient of the energy with respect to `edge_shift` is
    the gradient with respect to the edge vector (used for the virial and its per-atom split).

    **Arguments:**

    - `graph`: one `AtomicGraph` (not a stack).

    **Returns:**

    The graph with Cartesian shifts and identity cells.
    """
    cell = graph.cell[graph.system_index[graph.edge_index[1]]]
    shift = jnp.einsum("ek,ekd->ed", graph.edge_shift.astype(cell.dtype), cell)
    eye = jnp.broadcast_to(jnp.eye(3, dtype=graph.cell.dtype), graph.cell.shape)
    return eqx.tree_at(lambda g: (g.edge_shift, g.cell), graph, (shift.astype(graph.edge_shift.dtype), eye))


def atom_energies(
    model: UMA, graph: AtomicGraph, settings: ExecutionSettings = EXPORT_SETTINGS
) -> Float[Array, " atoms"]:
    """Per-atom energies (eV) whose sum over a system's owned atoms is the model's energy.

    The model's energy is `E = rmsd[d] sum_i e_i + mean[d] + sum_i ref[d, Z_i]` over the
    owned (`atom_mask`) atoms of a system of dataset `d` (see `EnergyReferences`); atom `i`
    is given `rmsd[d] e_i + ref[d, Z_i] + mean[d] / N`, with `N` the system's owned atoms.
    Atoms outside `atom_mask` (ghosts, padding) get 0.

    **Arguments:**

    - `model`: the model.
    - `graph`: the graph; `atom_mask` marks the atoms whose energies count.
    - `settings`: how to execute.

    **Returns:**

    `(atoms,)` energies in eV.
    """
    precision = jax.default_matmul_precision(settings.matmul_precision) if settings.matmul_precision else None
    if precision is None:
        raw, _ = model.node_energies(graph, settings=settings)
    else:
        with precision:
            raw, _ = model.node_energies(graph, settings=settings)
    refs = model.references
    mean, rmsd, table = jax.lax.stop_gradient((refs.energy_mean, refs.energy_rmsd, refs.element_references))
    dataset = graph.dataset_index[graph.system_index]
    mask = graph.atom_mask.astype(raw.dtype)
    owned = jax.ops.segment_sum(mask, graph.system_index, num_segments=graph.num_systems)
    share = (mean[dataset] / jnp.maximum(owned, 1)[graph.system_index]).astype(raw.dtype)
    reference = table[dataset, graph.atomic_numbers].astype(raw.dtype)
    return rmsd[dataset].astype(raw.dtype) * raw + (reference + share) * mask


@eqx.filter_jit
def energy_forces_virial(
    model: UMA, graph: AtomicGraph, settings: ExecutionSettings = EXPORT_SETTINGS
) -> dict[str, Array]:
    """Energy, forces, virial and per-atom energies and virials, in LAMMPS' conventions.

    With `E` the sum of [`atom_energies`][uma_eqx.export.atom_energies] over the owned atoms
    and `g_e = dE/dr_e` the gradient with respect to edge vector `r_e` (from source `j` to
    target `i`):

    $$F_k = -\\frac{\\partial E}{\\partial r_k}, \\qquad
      W = -\\sum_e r_e \\otimes g_e, \\qquad
      W_k = -\\tfrac12 \\sum_{e \\ni k} r_e \\otimes g_e,$$

    where the per-atom virial `W_k` gives half of each edge's term to each of its two atoms
    (LAMMPS' pair-style split), so that `sum_k W_k = W`. `W = -V sigma` for the stress
    `sigma = (1/V) dE/d(strain)` of [`uma_eqx.energy_forces_stress`][]; LAMMPS' pressure is
    `(N k T + trace W / 3) / V` plus units. Forces are returned for every atom, ghosts
    included (their forces belong to the atoms they image: LAMMPS' reverse communication).
    Energies depend on positions only through edge vectors, so `W` is exact.

    **Arguments:**

    - `model`: the model (experts merged or not).
    - `graph`: one `AtomicGraph` whose `edge_shift` holds Cartesian shifts and whose cells are
      identities (see [`cartesian_shifts`][uma_eqx.export.cartesian_shifts]); `atom_mask`
      marks the owned atoms.
    - `settings`: how to execute.

    **Returns:**

    A dict with `energy (systems,)` eV, `forces (atoms, 3)` eV/Å, `virial (systems, 3, 3)` eV,
    `atom_energies (atoms,)` eV and `atom_virials (atoms, 3, 3)` eV.
    """

    def total(positions, shifts):
        g = eqx.tree_at(lambda g: (g.positions, g.edge_shift), graph, (positions, shifts))
        e = atom_energies(model, g, settings)
        return jnp.sum(e), e

    (grad_r, grad_shift), e_atom = jax.grad(total, argnums=(0, 1), has_aux=True)(graph.positions, graph.edge_shift)
    vectors = graph.edge_vectors(far=model.config.cutoff + 1.0)
    vectors = jnp.where(graph.edge_mask[:, None], vectors, 0.0)
    edge_virial = -vectors[:, :, None] * grad_shift[:, None, :]
    source, target = graph.edge_index[0], graph.edge_index[1]
    n, s = graph.num_atoms, graph.num_systems
    atom_virial = 0.5 * (
        jax.ops.segment_sum(edge_virial, source, num_segments=n)
        + jax.ops.segment_sum(edge_virial, target, num_segments=n)
    )
    virial = jax.ops.segment_sum(edge_virial, graph.system_index[target], num_segments=s)
    energy = jax.ops.segment_sum(e_atom, graph.system_index, num_segments=s)
    return {
        "energy": energy,
        "forces": -grad_r,
        "virial": virial,
        "atom_energies": e_atom,
        "atom_virials": atom_virial,
    }


def _edge_mask(
    edge_index: Int[Array, "2 edges"], atomic_numbers: Int[Array, " atoms"]
) -> tuple[Int[Array, "2 edges"], Bool[Array, " edges"]]:
    """Padding edges (a negative index, or an endpoint that is a padding atom) masked, their
    indices sent to atom 0."""
    valid = jnp.all(edge_index >= 0, axis=0)
    index = jnp.where(valid[None, :], edge_index, 0)
    valid = valid & (atomic_numbers[index[0]] > 0) & (atomic_numbers[index[1]] > 0)
    return index, valid


@dataclasses.dataclass(frozen=True)
class ExportedPotential:
    """The function that [`export`][uma_eqx.export.export] serialises, as a Python callable.

    Calling convention (one system; `n` atoms = local atoms first, then ghosts, then padding;
    `e` directed edges; float = the model's dtype):

    - `atomic_numbers (n,) int32`: 0 marks a padding atom.
    - `positions (n, 3) float`, Å: local atoms and ghosts (ghosts at their image positions).
    - `edge_index (2, e) int32`: row 0 the source `j`, row 1 the target `i` of each edge
      (message `j -> i`), both indices into the atoms; a negative index marks a padding edge.
      `"full"` lists hold both directions of every pair within the cutoff, `"half"` lists
      each pair once (the function adds the reverse edge).
    - `edge_shift (e, 3) float`, Å: the edge vector is `positions[j] - positions[i] + edge_shift`
      (zero when ghosts carry their image positions; the cell shift `S H` otherwise).
    - `num_local () int32`: atoms `0 .. num_local - 1` are owned: their energies are summed.
    - `charge () int32`, `spin () int32`: total charge and spin multiplicity.

    Invalid inputs (an atomic number outside `0 .. max_num_elements - 1`, an edge index
    `>= n`, `num_local` outside `0 .. n`, charge or spin outside fairchem's ranges) give NaN
    outputs.

    Outputs: `energy () float` eV (sum over owned atoms), `forces (n, 3) float` eV/Å
    (`-dE/dx` for every atom, ghosts included), `virial (6,) float` eV and
    `atom_energies (n,)`, `atom_virials (n, 6)` (LAMMPS order `xx yy zz xy xz yz`; see
    [`energy_forces_virial`][uma_eqx.export.energy_forces_virial]).

    **Attributes:**

    - `model`: the model; `task_name`: its task; `neighbor_list`: `"full"` or `"half"`;
      `settings`: how to execute.
    """

    model: UMA
    task_name: str
    neighbor_list: NeighborListKind = "full"
    settings: ExecutionSettings = EXPORT_SETTINGS

    def __call__(
        self,
        atomic_numbers: Int[Array, " atoms"],
        positions: Float[Array, "atoms 3"],
        edge_index: Int[Array, "2 edges"],
        edge_shift: Float[Array, "edges 3"],
        num_local: Int[Array, ""],
        charge: Int[Array, ""],
        spin: Int[Array, ""],
    ) -> tuple[
        Float[Array, ""], Float[Array, "atoms 3"], Float[Array, "6"], Float[Array, " atoms"], Float[Array, "atoms 6"]
    ]:
        model = self.model
        if self.neighbor_list == "half":
            edge_index = jnp.concatenate([edge_index, edge_index[::-1]], axis=1)
            edge_shift = jnp.concatenate([edge_shift, -edge_shift], axis=0)
        index, edge_mask = _edge_mask(edge_index, atomic_numbers)
        n = atomic_numbers.shape[0]
        dtype = model.dtype
        as_vector = lambda v: jnp.reshape(v, (1,)).astype(jnp.int32)  # noqa: E731
        graph = AtomicGraph(
            positions=positions.astype(dtype),
            atomic_numbers=atomic_numbers.astype(jnp.int32),
            system_index=jnp.zeros((n,), jnp.int32),
            edge_index=index.astype(jnp.int32),
            edge_shift=edge_shift.astype(dtype),
            cell=jnp.eye(3, dtype=dtype)[None],
            charge=as_vector(charge),
            spin=as_vector(spin),
            dataset_index=jnp.full((1,), model.config.dataset_index(self.task_name), jnp.int32),
            atom_mask=(jnp.arange(n) < num_local) & (atomic_numbers > 0),
            edge_mask=edge_mask,
            system_mask=jnp.ones((1,), bool),
        )
        if model.backbone.router is not None:
            # routed by the owned atoms' composition, merged once per call (fairchem's merge_mole)
            model = merge_experts_for(model, graph)
        out = energy_forces_virial(model, graph, self.settings)
        # invalid inputs give NaN outputs (the exported program cannot raise)
        z, max_z = atomic_numbers, model.config.max_num_elements
        invalid = jnp.any((z < 0) | (z >= max_z)) | jnp.any(edge_index >= n)
        invalid = invalid | (charge < CHARGE_RANGE[0]) | (charge > CHARGE_RANGE[1])
        invalid = invalid | (spin < SPIN_RANGE[0]) | (spin > SPIN_RANGE[1]) | (num_local < 0) | (num_local > n)
        results = (out["energy"][0], out["forces"], voigt(out["virial"][0]), out["atom_energies"])
        results = results + (voigt(out["atom_virials"]),)
        return tuple(jnp.where(invalid, jnp.nan, r) for r in results)  # pyright: ignore[reportReturnType]


#: Names of the exported function's inputs and outputs, in order (the metadata lists them).
INPUT_NAMES = ("atomic_numbers", "positions", "edge_index", "edge_shift", "num_local", "charge", "spin")
OUTPUT_NAMES = ("energy", "forces", "virial", "atom_energies", "atom_virials")


def export(
    model: UMA,
    path: str | pathlib.Path,
    task_name: str | None = None,
    *,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    num_atoms: int | None = None,
    num_edges: int | None = None,
    neighbor_list: NeighborListKind = "full",
    settings: ExecutionSettings | None = None,
) -> list[pathlib.Path]:
    """Serialise the model's energy, forces and virial with `jax.export` for hosts without uma_eqx.

    Writes `path` (`jax.export.Exported.serialize()`: StableHLO with the weights as
    constants, lowered for every platform in `platforms`) and `path + ".json"` (metadata:
    cutoff, elements, task, dtype, versions, receptive field and the calling convention). The
    function is [`ExportedPotential`][uma_eqx.export.ExportedPotential]; its atom and edge
    counts are symbolic (`jax.export.symbolic_shape`), so one artifact serves every system
    size, unless `num_atoms` / `num_edges` fix them (then pad: atoms with atomic number 0,
    edges with index -1). Load it with `jax.export.deserialize(open(path, "rb").read())` and
    call `.call(*inputs)`; `docs/engines.md` has the full calling convention.

    **Arguments:**

    - `model`: the model.
    - `path`: the artifact's file name (e.g. `model.jaxexport`).
    - `task_name`: the task baked into the artifact (optional when the model has one).
    - `platforms`: jax.export platform names (`"cpu"`, `"cuda"`, `"rocm"`, `"tpu"`).
    - `num_atoms`, `num_edges`: fixed sizes instead of symbolic ones.
    - `neighbor_list`: `"full"` (both directions of each pair) or `"half"` (each pair once).
    - `settings`: how the exported program executes (default: `EXPORT_SETTINGS` for a
      symbolic edge count, `ExecutionSettings()` for a fixed one).

    **Returns:**

    The paths written: the artifact and its metadata.

    **Raises:**

    `ValueError` for an unknown task, neighbour-list kind or platform, or sizes below 1.
    """
    tasks = model.config.task_names
    if task_name is None:
        if len(tasks) != 1:
            raise ValueError(f"task_name is required for a model with several tasks; choose one of {list(tasks)}")
        task_name = tasks[0]
    model.config.dataset_index(task_name)  # raises with the list of tasks
    if neighbor_list not in ("full", "half"):
        raise ValueError(f"neighbor_list={neighbor_list!r}: use 'full' or 'half'")
    for name, size in (("num_atoms", num_atoms), ("num_edges", num_edges)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name}={size!r}: use a positive int, or None for a symbolic size")
    platforms = tuple(platforms)
    if not platforms:
        raise ValueError("platforms is empty: name at least one, e.g. ('cpu', 'cuda')")
    symbolic = jax.export.symbolic_shape("atoms, edges", constraints=(f"edges >= {MIN_EDGES}",))
    atoms = symbolic[0] if num_atoms is None else num_atoms
    edges = symbolic[1] if num_edges is None else num_edges
    dtype = model.dtype
    specs = (
        jax.ShapeDtypeStruct((atoms,), jnp.int32),
        jax.ShapeDtypeStruct((atoms, 3), dtype),
        jax.ShapeDtypeStruct((2, edges), jnp.int32),
        jax.ShapeDtypeStruct((edges, 3), dtype),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    if settings is None:
        settings = EXPORT_SETTINGS if num_edges is None else DEFAULT_SETTINGS
    function = ExportedPotential(model, task_name, neighbor_list, settings)
    try:
        with _checks_off():
            # a closure: jit would hash `function` (static), and its model holds arrays
            exported = jax.export.export(jax.jit(lambda *inputs: function(*inputs)), platforms=platforms)(*specs)
    except ValueError as e:
        if "platform" in str(e).lower():
            raise ValueError(f"cannot lower for platforms {platforms}: {e}") from e
        raise
    path = pathlib.Path(path)
    path.write_bytes(exported.serialize())
    meta = path.with_name(path.name + ".json")
    meta.write_text(
        json.dumps(export_metadata(model, task_name, exported, neighbor_list), indent=1, ensure_ascii=False) + "\n"
    )
    return [path, meta]


@contextlib.contextmanager
def _checks_off():
    """Trace the graph's `eqx.error_if` checks as nothing (the exported function checks its inputs).

    Equinox's run-time errors are host callbacks, which cannot be serialised; its NaN mode
    cannot trace symbolic shapes. `EQX_ON_ERROR=off` (equinox's documented switch, read from
    `equinox._errors` when a check is traced) drops them; `ExportedPotential` returns NaN for
    invalid inputs instead.
    """
    import equinox._errors as errors

    if not hasattr(errors, "EQX_ON_ERROR"):
        raise RuntimeError(
            f"this equinox ({eqx.__version__}) has no equinox._errors.EQX_ON_ERROR; set EQX_ON_ERROR=off in the "
            "environment before importing equinox to export"
        )
    before = errors.EQX_ON_ERROR  # pyright: ignore[reportPrivateImportUsage]
    errors.EQX_ON_ERROR = "off"  # pyright: ignore[reportPrivateImportUsage]
    try:
        yield
    finally:
        errors.EQX_ON_ERROR = before  # pyright: ignore[reportPrivateImportUsage]


def export_metadata(model: UMA, task_name: str, exported: "jax.export.Exported", neighbor_list: str) -> dict:
    """The metadata sidecar of an exported artifact (see `docs/engines.md`)."""
    from importlib.metadata import PackageNotFoundError, version

    from ase.data import chemical_symbols

    try:
        ours = version("uma_eqx")
    except PackageNotFoundError:
        ours = "0+unknown"
    cfg = model.config
    elements = None if cfg.elements is None else [int(z) for z in cfg.elements]
    dtype = jnp.dtype(model.dtype).name
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "uma_eqx_version": ours,
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "task_name": task_name,
        "dataset_index": cfg.dataset_index(task_name),
        "cutoff": cfg.cutoff,
        "num_layers": cfg.num_layers,
        # owned atoms' energies are exact when every atom within this distance is present
        # (edge-degree embedding plus one hop per layer)
        "receptive_field": (cfg.num_layers + 1) * cfg.cutoff,
        "elements": elements,
        "element_symbols": None if elements is None else [chemical_symbols[z] for z in elements],
        "max_num_elements": cfg.max_num_elements,
        "dtype": dtype,
        "neighbor_list": neighbor_list,
        "model_id": cfg.model_id,
        "model_version": cfg.model_version,
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "virial": "eV"},
        "inputs": [
            {"name": name, "shape": [str(d) for d in aval.shape], "dtype": aval.dtype.name}
            for name, aval in zip(INPUT_NAMES, exported.in_avals)
        ],
        "outputs": [
            {"name": name, "shape": [str(d) for d in aval.shape], "dtype": aval.dtype.name}
            for name, aval in zip(OUTPUT_NAMES, exported.out_avals)
        ],
        "virial_order": ["xx", "yy", "zz", "xy", "xz", "yz"],
    }
