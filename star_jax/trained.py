"""Trained or converted components by name: a train workdir, a stage's `best/` or a params checkpoint ->
{component: params}, and placing loaded params onto a model's shapes and shardings.

Every stage names its sub-trees by component (`hubert`, `bridge`, `classifier`, `dit`, `vae`) in
`state.params` (trainable) or `state.frozen`, so a later stage, `prepare cache` or `export` picks them by name.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from star_jax import checkpoint, paths
from star_jax.errors import UserError


def load_trained(path: str) -> tuple[dict, str]:
  """A train workdir (its `best/` if any, else its latest checkpoint), a stage's `best/` folder, an inference
  bundle or a converted params checkpoint -> ({component: numpy tree}, kind).

  Train states merge `params` and `frozen`; an EMA of the params, when kept, replaces them.
  """
  path = _resolve(path)
  if (path / "params").is_dir():
    tree, meta = checkpoint.load_params(path)
    kind = meta.get("kind", "")
    if set(tree) <= {"params", "frozen", "ema"} and "params" in tree:
      return _merge(_with_frozen(tree, path.parent)), kind
    if kind == "bundle":  # star-jax export: hubert, bridge, dit and vae by name
      return dict(tree), kind
    return {kind: tree}, kind  # a converted component (star-jax convert KIND)
  ckpt_dir = path / "checkpoints"
  if ckpt_dir.is_dir():
    state, meta = checkpoint.TrainCheckpointer(ckpt_dir).restore_numpy()
    return _merge(_with_frozen(state, path)), meta.get("stage", "")
  raise UserError(f"'{path}' is neither a star-jax train workdir (no checkpoints/ or best/) nor a params "
                  f"checkpoint; give the workdir of the stage that trained it")


def is_trained(path: str) -> bool:
  """Whether `load_trained` reads `path`: a train workdir, a `best/`, a bundle or a params checkpoint of ours."""
  path = _resolve(path)
  return (path / "params").is_dir() or (path / "checkpoints").is_dir()


def trained_config(path: str) -> dict | None:
  """The config saved with what `load_trained(path)` reads (a params checkpoint's `config`, or the config.json
  a train workdir holds), as a dict; None when there is none."""
  path = _resolve(path)
  meta_path = path / "config.json"
  if not meta_path.exists():
    return None
  meta = json.loads(meta_path.read_text())
  return meta.get("config") if (path / "params").is_dir() else meta


def _resolve(path: str):
  """A workdir with a `best/` -> that `best/`; anything else as given (absolute, or a URL)."""
  path = paths.run_path(path)
  best = path / "best"
  return best if (best / "params").is_dir() else path


def _with_frozen(state: dict, workdir) -> dict:
  """A train state as checkpoints and best/ hold it lacks the frozen sub-models but their updated statistics: the
  run wrote them once to `workdir/frozen` (checkpoint.save_frozen)."""
  if (workdir / "frozen" / "params").is_dir():  # under what they hold of it (BatchNorm statistics)
    state = {**state, "frozen": checkpoint.overlay(checkpoint.load_params(workdir / "frozen")[0], state.get("frozen"))}
  return state


def _merge(state: dict) -> dict:
  """frozen, then params, then the EMA, merged key by key (stage 2 splits the bridge across trees)."""
  merged: dict = {}
  for part in ("frozen", "params", "ema"):
    merged = checkpoint.overlay(merged, state.get(part))
  return merged


def component(path: str, name: str) -> Any:
  """One named component (e.g. 'dit') out of `load_trained(path)`."""
  parts, kind = load_trained(path)
  if name not in parts:
    raise UserError(f"'{path}' ({kind or 'unknown kind'}) has no '{name}' parameters; it has {sorted(parts)}")
  return parts[name]


def put_like(tree: Any, target: Any, what: str) -> Any:
  """Place a loaded numpy tree with the shapes and shardings of `target` (a tree of jax Arrays)."""
  got = jax.tree_util.tree_structure(tree)
  want = jax.tree_util.tree_structure(target)
  if got != want:
    raise UserError(f"{what}: the loaded parameters do not match this config's model structure; "
                    f"check that the config sizes match the checkpoint")
  def put(x, t):
    if np.shape(x) != t.shape:
      raise UserError(f"{what}: a loaded parameter has shape {np.shape(x)}, the model expects {t.shape}")
    return jax.device_put(np.asarray(x, dtype=t.dtype), t.sharding)
  return jax.tree.map(put, tree, target)
