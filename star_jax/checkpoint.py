"""Orbax checkpoints: plain param trees with their model config beside them.

`save_params(dir, params, config)` writes `dir/params` (orbax, a standard pytree checkpoint) and
`dir/config.json`; `load_params(dir)` reads both back. Converters and `export` use these; the training
loop's CheckpointManager (state + data iterator) builds on the same layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from star_jax.errors import UserError


def _jsonable(config: Any) -> Any:
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_params(directory: str, params: Any, config: Any = None, kind: str = "") -> str:
  """Write params (a nested dict of arrays) and an optional config to `directory`; returns its path."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "params")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.tree.map(np.asarray, params), force=True)
  meta = {"kind": kind, "config": _jsonable(config) if config is not None else None}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return directory


def load_params(directory: str, sharding: Any = None) -> tuple[Any, dict]:
  """Read `directory` written by `save_params` -> (params, {'kind': ..., 'config': ...})."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  target = os.path.join(directory, "params")
  if not os.path.isdir(target):
    raise UserError(f"'{directory}' is not a star-jax params checkpoint (no 'params' folder); "
                    f"write one with `star-jax convert` or `star-jax export`")
  meta_path = os.path.join(directory, "config.json")
  meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"kind": "", "config": None}
  with ocp.StandardCheckpointer() as ckptr:
    if sharding is None:
      params = ckptr.restore(target)
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              ckptr.metadata(target).item_metadata.tree, sharding)
      params = ckptr.restore(target, abstract)
  return params, meta
