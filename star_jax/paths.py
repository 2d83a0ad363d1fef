"""Run-state paths: a local folder or an object-store URL (gs://, s3://, ...), through etils.epath as orbax.

A training workdir on a pod must be one place every host sees, which is a bucket: every path the
trainer, export, generate and evaluate read or write for run state goes through `run_path`, never
`os.path`. URLs are kept as they are (no `abspath`, which would turn `gs://b/x` into `./gs:/b/x`).
Object stores cannot append, so `append_lines` rewrites the object; files that only process 0 should
write are written through `write_text` behind a `jax.process_index() == 0` check at the call site.
"""

from __future__ import annotations

import os
from typing import Any

from star_jax.errors import UserError


def is_url(path: Any) -> bool:
  return "://" in str(path)


def run_path(path: Any):
  """A local path (made absolute) or a URL -> etils.epath.Path; a URL scheme with no backend is a UserError."""
  from etils import epath

  if isinstance(path, epath.Path) and (is_url(path) or os.path.isabs(str(path))):
    return path
  if not is_url(path):
    return epath.Path(os.path.abspath(os.fspath(path)))
  scheme = str(path).split("://", 1)[0]
  if scheme in ("gs", "s3", "az"):
    _require_backend(scheme, str(path))
  return epath.Path(str(path))


def _require_backend(scheme: str, path: str) -> None:
  """etils.epath reads gs:// (s3://, az://) through TensorFlow's gfile or fsspec; one must be installed."""
  import importlib.util

  module = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}[scheme]
  if importlib.util.find_spec(module) or importlib.util.find_spec("tensorflow"):
    return
  raise UserError(f"{path}: reading {scheme}:// needs the '{module}' package "
                  f"(pip install '{module}', or pip install 'star-jax[gcs]' for gs://)")


def read_text(path: Any) -> str:
  return run_path(path).read_text()


def write_text(path: Any, text: str) -> None:
  """Write a whole file (its folder is made first)."""
  p = run_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(text)


def append_lines(path: Any, lines: list[str]) -> None:
  """Append lines to a text file; on an object store (no append) the object is rewritten."""
  p = run_path(path)
  if not is_url(p):
    with open(os.fspath(p), "a") as f:
      f.writelines(lines)
    return
  write_text(p, (p.read_text() if p.exists() else "") + "".join(lines))


def exists(path: Any) -> bool:
  return run_path(path).exists()


def isdir(path: Any) -> bool:
  return run_path(path).is_dir()
