"""Data parallel: a batch of systems split over a 1-D mesh of devices.

The batch is a stack of padded graphs (one or more per device) along a new leading axis,
sharded over the mesh axis [`uma_eqx.parallel.BATCH_AXIS`][]; every device runs the one-graph program on its
own graphs (`jax.vmap` inside `jax.shard_map`), so the model itself never communicates. Graphs
are whole batches of systems (atoms and edges flat, indices local to the graph); sharding the
flat atom axis of one big graph instead would need a gather of every source atom across devices
in every layer, which is what graph parallelism is for.
"""

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import DTypeLike

from .._graph import AtomicGraph

if TYPE_CHECKING:
    from jaxlib._jax import Device  # the class `jax.Device` names (an alias that pyright refuses as a type)
else:
    Device = jax.Device

#: Name of the mesh axis along which stacks of graphs are split.
BATCH_AXIS = "batch"

T = TypeVar("T")


def resolve_devices(devices: "int | Sequence[Device] | None" = None) -> list[Device]:
    """The devices a data-parallel run uses.

    **Arguments:**

    - `devices`: `None` for all of this process's devices (`jax.local_devices()`), an int `n`
        for the first `n` of them, or a sequence of `jax.Device`s (for example `jax.devices()`,
        every process's devices, after [`uma_eqx.parallel.initialize`][]).

    **Returns:**

    The devices, in order.

    **Raises:**

    `ValueError` for a count outside `1 .. len(jax.local_devices())`, an empty sequence, a
    repeated device or something that is not a device.
    """
    local = jax.local_devices()
    if devices is None:
        return list(local)
    if isinstance(devices, bool):
        raise ValueError(f"devices={devices!r} is invalid: use None, a device count or a list of jax devices.")
    if isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={int(devices)} is invalid: this process has {len(local)} "
                f"{local[0].platform} device(s); use 1..{len(local)} (or more CPU devices with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N, set before JAX starts)."
            )
        return list(local[: int(devices)])
    chosen = list(devices)
    if not chosen:
        raise ValueError("devices is an empty sequence: pass None (all local devices), a count or some devices.")
    for d in chosen:
        if not isinstance(d, jax.Device):
            raise ValueError(f"devices holds {d!r} ({type(d).__name__}), not a jax.Device: pass jax.devices() items.")
    if len({d.id for d in chosen}) != len(chosen):
        raise ValueError(f"devices lists a device twice ({[d.id for d in chosen]}); pass each device once.")
    return chosen


def batch_mesh(devices: "int | Sequence[Device] | None" = None) -> Mesh:
    """A 1-D mesh with the axis [`uma_eqx.parallel.BATCH_AXIS`][] over `devices`.

    **Arguments:**

    - `devices`: as for [`uma_eqx.parallel.resolve_devices`][].

    **Returns:**

    The `jax.sharding.Mesh`.
    """
    return Mesh(np.array(resolve_devices(devices)), (BATCH_AXIS,))


def split_evenly(items: Sequence[T], parts: int) -> list[list[T]]:
    """Split `items` into `parts` contiguous groups whose sizes differ by at most one.

    The first `len(items) % parts` groups hold one more item; groups may be empty when there
    are fewer items than parts. Concatenating the groups gives `items` back.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"split_evenly needs a positive number of parts, got {parts!r}.")
    base, extra = divmod(len(items), parts)
    groups, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        groups.append(list(items[start : start + size]))
        start += size
    return groups


def empty_graph(
    num_atoms: int, num_edges: int, num_systems: int, dtype: DTypeLike, like: AtomicGraph | None = None
) -> AtomicGraph:
    """A graph of padding only (every mask `False`), to fill a device that has no systems.

    Its entries are the padded values of [`uma_eqx.pad_graph`][]: atoms at the origin with
    atomic number 0, all in the last system; edges zero-shift self-loops on the last atom;
    systems with an identity cell, charge, spin and dataset 0. Models give it zero energies
    and forces.

    **Arguments:**

    - `num_atoms`, `num_edges`, `num_systems`: its sizes (each at least 1).
    - `dtype`: float dtype of positions, shifts and cells.
    - `like`: a graph whose static (non-array) fields the result copies, so that the two
        stack ([`uma_eqx.parallel.shard_stack`][]) and share one compiled program; padding passes every check
        [`uma_eqx.AtomicGraph.checked`][] makes, for any model.

    **Returns:**

    The `AtomicGraph`.
    """
    for name, value in (("num_atoms", num_atoms), ("num_edges", num_edges), ("num_systems", num_systems)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"empty_graph: {name}={value!r} must be a positive int.")
    index = jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32
    graph = AtomicGraph(
        positions=jnp.zeros((num_atoms, 3), dtype),
        atomic_numbers=jnp.zeros(num_atoms, index),
        system_index=jnp.full(num_atoms, num_systems - 1, index),
        edge_index=jnp.full((2, num_edges), num_atoms - 1, index),
        edge_shift=jnp.zeros((num_edges, 3), dtype),
        cell=jnp.broadcast_to(jnp.eye(3, dtype=dtype), (num_systems, 3, 3)),
        charge=jnp.zeros(num_systems, index),
        spin=jnp.zeros(num_systems, index),
        dataset_index=jnp.zeros(num_systems, index),
        atom_mask=jnp.zeros(num_atoms, bool),
        edge_mask=jnp.zeros(num_edges, bool),
        system_mask=jnp.zeros(num_systems, bool),
    )
    if like is None:
        return graph
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(graph))


def shard_stack(trees: Sequence[Any], mesh: Mesh) -> Any:
    """Stack equal-shaped pytrees along a new leading axis, split over `mesh`'s batch axis.

    Every process of a multi-process run passes the same `trees` (each keeps the slices of its
    own devices). The number of trees must be a multiple of the mesh size: pad with
    [`uma_eqx.parallel.empty_graph`][] (or any filler whose results you drop).

    **Arguments:**

    - `trees`: pytrees with identical structure, shapes and dtypes (e.g. `AtomicGraph`s
        padded to common sizes, or dicts of labels).
    - `mesh`: a mesh from [`uma_eqx.parallel.batch_mesh`][].

    **Returns:**

    The stacked pytree; each array leaf sharded as `NamedSharding(mesh, P("batch"))`.
    """
    trees = list(trees)
    if not trees or len(trees) % mesh.size:
        raise ValueError(
            f"shard_stack got {len(trees)} items for {mesh.size} devices; give a positive multiple of "
            f"{mesh.size} (fill with empty_graph)."
        )
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))

    def place(*leaves):
        host = np.stack([np.asarray(leaf) for leaf in leaves])
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, *trees)


def replicate(tree: T, mesh: Mesh) -> T:
    """`tree` with every array leaf copied to all devices of `mesh` (`P()`); other leaves kept."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if not eqx.is_array(leaf):
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Every array leaf as a numpy array holding all of its values (gathered across processes)."""

    def fetch(leaf):
        if not isinstance(leaf, jax.Array):
            return np.asarray(leaf)
        if leaf.is_fully_addressable:
            return np.asarray(leaf)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)


def data_parallel(fn: Callable[[Any, Any], Any], mesh: Mesh) -> Callable[[Any, Any], Any]:
    """Run `fn(shared, item)` on every item of a stack, the stack split over `mesh`.

    The returned `call(shared, stacked)` computes `jax.vmap(lambda item: fn(shared, item))(stacked)`
    with `jax.shard_map`: device `d` of `mesh` gets `shared` whole (e.g. the model) and its
    own slice of the leading axis of `stacked` (see [`uma_eqx.parallel.shard_stack`][]), and runs `fn` on its
    items, without communication. The outputs are stacked along the same leading axis and
    sharded as the input. It traces: call it inside `jax.jit` / `eqx.filter_jit` (it is
    differentiable there; the gradient of replicated `shared` is summed over devices). Non-array
    leaves of `shared` and `stacked` are closed over as static values.

    This is the hook for compiled steps over many systems (`uma_eqx.predict`, training, a
    batched relaxation): stack one padded state per device, wrap the step with it.

    **Arguments:**

    - `fn`: `fn(shared, item) -> pytree of arrays`, written for one item.
    - `mesh`: a 1-D mesh from [`uma_eqx.parallel.batch_mesh`][].

    **Returns:**

    `call(shared, stacked) -> stacked outputs` (leading axis = that of `stacked`).
    """
    spec = PartitionSpec(BATCH_AXIS)

    def call(shared, stacked):
        shared_arrays, shared_static = eqx.partition(shared, eqx.is_array)
        stacked_arrays, stacked_static = eqx.partition(stacked, eqx.is_array)
        leading = {x.shape[0] for x in jax.tree.leaves(stacked_arrays)}
        if len(leading) != 1 or next(iter(leading)) % mesh.size:
            raise ValueError(
                f"data_parallel: the stacked leaves have leading sizes {sorted(leading)}; they need one common "
                f"size that is a multiple of the {mesh.size} devices (use shard_stack)."
            )

        def local(shared_local, stacked_local):
            whole = eqx.combine(shared_local, shared_static)
            if next(iter(leading)) == mesh.size:
                # One item per device (the usual case): call `fn` on it directly. A vmap over a
                # size-1 axis would batch every matmul, gather and scatter of the model, which
                # XLA's CPU backend runs several times slower than the plain ones.
                item = jax.tree.map(lambda x: x[0], stacked_local)
                out = fn(whole, eqx.combine(item, stacked_static))
                return jax.tree.map(lambda x: x[None], out)
            return jax.vmap(lambda item: fn(whole, eqx.combine(item, stacked_static)))(stacked_local)

        # check_vma=False: equinox run-time checks (eqx.error_if) trace a `lax.cond` whose branches differ
        # in varying-axis types, which the checker refuses; nothing here communicates.
        mapped = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec, check_vma=False)
        return mapped(shared_arrays, stacked_arrays)

    return call


def device_capacity(batch_size: int, num_devices: int) -> int:
    """Systems per device graph for batches of `batch_size` over `num_devices`: `ceil(b / d) + 1`.

    The one extra system holds padded atoms (see [`uma_eqx.pad_graph`][]).
    """
    return math.ceil(batch_size / num_devices) + 1
