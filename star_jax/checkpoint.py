"""Orbax checkpoints: plain param trees with their model config beside them.

`save_params(dir, params, config)` writes `dir/params` (orbax, a standard pytree checkpoint) and
`dir/config.json`; `load_params(dir)` reads both back. Converters and `export` use these; the training
loop's CheckpointManager (state + data iterator) builds on the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

import jax
import numpy as np

from star_jax import paths
from star_jax.errors import UserError


def _jsonable(config: Any) -> Any:
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


@functools.cache
def _orbax():
  """orbax.checkpoint, its jax.Array handler set for this backend (once per process). On CPU, no replica-parallel
  saving: orbax's default (off only for GPU) splits every replicated array into one slice per device, each a
  dispatched (and, per new shape, compiled) slice op, only to write the pieces from the same process: 12.5 s of
  the tests' 40-s 8-device stage-2 run, 28 s in all without. TPU and GPU keep orbax's default."""
  import orbax.checkpoint as ocp

  if jax.default_backend() == "cpu":
    absl_log = logging.getLogger("absl")  # orbax warns that the handler is replaced: on purpose here
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                              override=True)
    finally:
      absl_log.setLevel(level)
  return ocp


def save_params(directory: str, params: Any, config: Any = None, kind: str = "") -> str:
  """Write params (a nested dict of arrays) and an optional config to `directory` (a folder or URL);
  returns its path. Every process calls it: orbax writes each process's shards of global arrays, and
  process 0 writes the config."""
  ocp = _orbax()

  directory = paths.run_path(directory)
  params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params, force=True)
  if jax.process_index() == 0:
    meta = {"kind": kind, "config": _jsonable(config) if config is not None else None}
    paths.write_text(directory / "config.json", json.dumps(meta, indent=2))
  return str(directory)


def load_params(directory: str, sharding: Any = None) -> tuple[Any, dict]:
  """Read `directory` written by `save_params` -> (params, {'kind': ..., 'config': ...})."""
  import orbax.checkpoint as ocp

  directory = paths.run_path(directory)
  target = directory / "params"
  if not target.is_dir():
    raise UserError(f"'{directory}' is not a star-jax params checkpoint (no 'params' folder); "
                    f"write one with `star-jax convert` or `star-jax export`")
  meta_path = directory / "config.json"
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"kind": "", "config": None}
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(target).item_metadata.tree
    if sharding is None:  # onto this process's first device, whatever mesh or process count wrote it
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      sharding = jax.tree.map(lambda _: device, saved)
    params = ckptr.restore(target, abstract_tree(saved, sharding))
  return params, meta


def save_frozen(workdir: Any, frozen: Any) -> None:
  """Frozen sub-models (HuBERT, the Q-Former body, the VAE: ~2 GB in paper stage 2) are written once per
  run, to `workdir/frozen`, not into every checkpoint and `best/` (TrainCheckpointer saves them as None)."""
  if jax.tree.leaves(frozen):
    save_params(paths.run_path(workdir) / "frozen", frozen, kind="frozen")


def load_frozen(workdir: Any, shardings: Any) -> Any:
  """`save_frozen`'s tree, restored into `shardings` (a tree of shardings; empty when nothing is frozen)."""
  if not jax.tree.leaves(shardings):
    return shardings
  directory = paths.run_path(workdir) / "frozen"
  if not (directory / "params").is_dir():
    raise UserError(f"'{directory}' is missing: the run's frozen sub-models are written there once and its "
                    f"checkpoints do not hold them; start the run again in a new workdir")
  return load_params(directory, shardings)[0]


def mutable_frozen(frozen: Any) -> Any:
  """The parts of the frozen tree that a step updates (BatchNorm running statistics, `batch_stats`, of an MLP
  bridge in stage 1): train state, so checkpoints and `best/` keep them; None when there are none."""
  if not isinstance(frozen, dict):
    return None
  out = {}
  for k, v in frozen.items():
    sub = v if k == "batch_stats" else mutable_frozen(v)
    if sub is not None:
      out[k] = sub
  return out or None


def overlay(base: Any, top: Any) -> Any:
  """`base` with the nested dict `top` put over it key by key (None: nothing to put): the frozen tree under its
  saved statistics, a train state's params over its frozen parts, a step's updates to the frozen tree."""
  if not isinstance(top, dict) or not isinstance(base, dict):
    return base if top is None else top
  return {**base, **{k: overlay(base.get(k), v) for k, v in top.items()}}


def abstract_tree(shapes: Any, shardings: Any) -> Any:
  """Shapes (from `jax.eval_shape`) + shardings -> ShapeDtypeStructs to restore straight into place."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


class TrainCheckpointer:
  """An orbax CheckpointManager for one training run: train state + data iterator + loop meta per step.

  Each step folder holds `state` (a pytree, restored into abstract sharded targets, so a different mesh
  shape works), `data` (the grain iterator's state, one file per process) and `meta` (JSON: e.g. the best
  validation score). Saves are asynchronous and keep the latest `keep` steps; orbax writes into a
  temporary folder and renames it when complete, so a run killed mid-save restores the previous step.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    ocp = _orbax()

    self.directory = paths.run_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Start saving `step` (returns once device arrays are copied; files are written in the background)."""
    import grain.checkpoint
    import orbax.checkpoint as ocp

    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restore `step` (default: latest) into `abstract_state`'s shapes and shardings -> (state, meta).

    `data_iter`, when given, is set to the saved iterator position in place.
    """
    import grain.checkpoint
    import orbax.checkpoint as ocp

    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint to restore in '{self.directory}'")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      if not (self.directory / str(step) / "data").is_dir():
        raise UserError(f"checkpoint step {step} in '{self.directory}' has no data iterator state")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], dict(restored["meta"] or {})

  def restore_numpy(self, step: int | None = None) -> tuple[dict, dict]:
    """Restore `step` (default: latest) as host numpy arrays, on any device count -> (state dict, meta)."""
    import orbax.checkpoint as ocp

    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint to restore in '{self.directory}'")
    state_dir = self.directory / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(state_dir).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return state, dict(meta or {})

  def wait(self) -> None:
    """Block until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
