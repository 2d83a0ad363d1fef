"""Metrics out of a run: JSONL in the workdir, TensorBoard event files when tensorboardX is installed.

Only process 0 writes. On resume the JSONL is cut back to the restored step, so a run killed after its
last checkpoint never leaves duplicated or orphaned steps behind. The workdir may be a URL (gs://...):
see star_jax.paths.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import jax

from star_jax import paths


class MetricWriter:
  """`write(step, {'loss': ...}, split='train')` appends one JSON line per call."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    workdir = paths.run_path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._truncate(resume_step or 0)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"))  # tensorboardX writes gs:// and s3:// itself
    except ImportError:
      self._tb = None

  def _truncate(self, step: int) -> None:
    if not self.path.exists():
      return
    keep = [line + "\n" for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    paths.write_text(self.path, "".join(keep))

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    paths.append_lines(self.path, [json.dumps(row) + "\n"])
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  v = v.item() if hasattr(v, "item") else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  """The rows of a run's metrics.jsonl for one split, in step order."""
  path = paths.run_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return sorted((r for r in rows if r.get("split") == split), key=lambda r: r["step"])
