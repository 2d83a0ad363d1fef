"""All mesh code: the device mesh, logical-axis rules, param and batch shardings, global batches.

Models speak only logical axis names (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `conv_in`,
`conv_out`, `vocab`); the config's `logical_axis_rules` maps them onto the mesh axes
(`data`, `fsdp`, `tensor`). A mesh axis serves at most one dimension of an array: a later rule for the
same logical name is the fallback when the first one's mesh axis is taken (e.g. activations' `embed`
when `batch` already uses `fsdp`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from star_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
FSDP_AXIS = "fsdp"  # params, gradients and optimizer state split here; gathered for compute (gather_fsdp)
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolve {'data': -1, 'fsdp': 2, 'tensor': 1} against the device count (-1 fills the rest)."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise UserError(f"mesh: unknown axis {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: only one axis may be -1, got {fill}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise UserError(f"mesh: sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise UserError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes} "
                       f"(product {fixed}); change config.mesh")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh: {sizes} needs {fixed} devices but {num_devices} are present; "
                     f"set one axis to -1 or change config.mesh")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_rules(rules_cfg: Sequence[Sequence[Any]]) -> Rules:
  """Config rules (lists, as ConfigDict stores them) -> flax's tuple-of-pairs form."""
  out = []
  for name, target in rules_cfg:
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if t not in MESH_AXES]
    else:
      bad = [] if target is None or target in MESH_AXES else [target]
    if bad:
      raise UserError(f"logical_axis_rules: '{name}' maps to unknown mesh axis {bad}; "
                       f"use {MESH_AXES} or None")
    out.append((str(name), target))
  return tuple(out)


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree of (abstract) `nn.LogicallyPartitioned` leaves."""
  return nn.get_partition_spec(boxed_tree)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every leaf of a boxed tree; unannotated leaves are replicated.

  A mesh axis that does not divide its dimension (a 1-channel conv, 527 classes) is dropped there:
  JAX cannot shard unevenly, and that dimension is small.
  """
  shardings = nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)
  return jax.tree.map(lambda s, x: with_fsdp(fit_sharding(s, x.shape), x.shape), shardings,
                      nn.unbox(boxed_tree), is_leaf=lambda s: isinstance(s, NamedSharding))


def gather_fsdp(param: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """A param as compute uses it under FSDP (ZeRO-3): gathered over the `fsdp` mesh axis, still split over
  the others (tensor parallelism). Storage, gradients and optimizer state stay split over `fsdp`; the
  gradient of this constraint is the reduce-scatter back. A no-op outside a mesh / rules context.

  Leaving the choice to XLA is not only slower to reason about: on a data x fsdp x tensor mesh its SPMD
  partitioner computed a wrong DiT loss when a kernel was split over `fsdp` on its input axis while the
  batch was too (tests/test_train_stages.py::test_stage2_loss_sharded_equals_single_device).
  """
  rules = nn.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return param
  spec = [_spec_entry([a for a in _mesh_axes(axes) if a != FSDP_AXIS])
          for axes in nn.logical_to_mesh_axes(tuple(names), rules)]
  return jax.lax.with_sharding_constraint(param, P(*spec))


def _mesh_axes(entry: Any) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis or a tuple of them) -> a tuple of mesh axes."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _spec_entry(axes: Sequence[str]) -> Any:
  """The inverse of `_mesh_axes`: () -> None, one axis -> its name, several -> a tuple."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def with_fsdp(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """A kernel whose logical axes put nothing on `fsdp` (e.g. a LoRA rank axis) is split over `fsdp` on
  its largest free dimension that `fsdp` divides, so FSDP memory falls as 1/fsdp for every kernel."""
  mesh = sharding.mesh
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  spec = list(tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec)))
  used = {a for axes in spec for a in _mesh_axes(axes)}
  if len(shape) < 2 or size == 1 or FSDP_AXIS in used:
    return sharding
  free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0]
  if not free:
    return sharding
  spec[max(free, key=lambda d: shape[d])] = FSDP_AXIS
  return NamedSharding(mesh, P(*spec))


def fit_sharding(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """`sharding` with each dimension's mesh axes kept only while their product divides the dimension."""
  spec = []
  for d, axes in enumerate(tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    kept, size = [], 1
    for name in _mesh_axes(axes):
      if shape[d] % (size * sharding.mesh.shape[name]) == 0:
        kept.append(name)
        size *= sharding.mesh.shape[name]
    spec.append(_spec_entry(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return NamedSharding(sharding.mesh, P(*spec))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args) -> tuple[Any, Any]:
  """Build `init_fn(*args)` directly in its sharded layout -> (plain param tree, shardings).

  Shapes first (`jax.eval_shape`), shardings from the logical rules, then `jax.jit(out_shardings=...)`,
  so no device ever materialises the full tree.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = nn.unbox(tree_shardings(abstract, mesh, rules))

  def init_unboxed(*a):
    return nn.unbox(init_fn(*a))

  with nn.logical_axis_rules(rules):
    tree = jax.jit(init_unboxed, out_shardings=shardings)(*args)
  return tree, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; all other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the global batch is split (data × fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Fail before compilation when the batch cannot be split over the data axes."""
  d = batch_divisor(mesh)
  if global_batch_size % d:
    raise UserError(f"batch size {global_batch_size} is not divisible by the data axes "
                     f"data×fsdp = {d} of mesh {dict(mesh.shape)}; pick a multiple of {d}")


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of the global batch that this process feeds: those its own devices hold (contiguous)."""
  check_batch_size(global_batch_size, mesh)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"this process's batch rows {rows} are not contiguous; build the mesh with "
                     f"make_mesh so each process's devices are adjacent on the data axes")
  return slice(start, stop)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This process's numpy batch (its slice of the global batch) -> global jax arrays on the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def place_on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Keep leaves already laid out on `mesh`; replicate every other leaf (e.g. optimizer step counts)."""
  def place(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(place, tree)


def shardings_of(tree: Any) -> Any:
  """The sharding of every leaf of a tree of jax Arrays."""
  return jax.tree.map(lambda x: x.sharding, tree)
