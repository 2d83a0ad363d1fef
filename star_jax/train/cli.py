"""Train one stage (vae, tta, stage1, stage2, meanflow) from a config; resumes from the workdir's checkpoints.

  star-jax train --config configs/star.py:tiny --stage stage2 --workdir outputs/tiny/stage2 \\
      --set stage2.init_dit=outputs/tiny/tta --set stage2.init_bridge=outputs/tiny/stage1

SIGTERM or Ctrl-C saves a checkpoint and exits 0; running the same command again continues bit-exactly.
A NaN/Inf loss stops the run (exit 1) naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from star_jax import distributed
from star_jax.constants import STAGES


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="configs/star.py:tiny", help="FILE.py:VARIANT (default: %(default)s)")
  p.add_argument("--stage", required=True, choices=STAGES)
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set stage2.lr=1e-4 (repeatable)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
  p.add_argument("--skip-bad-records", action="store_true",
                 help="replace unreadable records by good ones and count them (data.skip_bad_records=True)")
  distributed.add_distributed_arguments(p)


def setup_logging() -> None:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
  logging.getLogger("star_jax").setLevel(logging.INFO)


def check_config(cfg, stage_name: str) -> None:
  """Mesh vs devices and batch vs data axes, before any data is opened or anything compiled."""
  from star_jax import sharding
  from star_jax.train.stage import stage_section

  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  sharding.check_batch_size(int(cfg[stage_section(stage_name)].batch_size), mesh)


def run(args: argparse.Namespace) -> int:
  distributed.initialize_from_args(args)  # multi-host: before anything asks JAX for its devices
  from star_jax.config import load_config
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage

  setup_logging()
  overrides = list(args.overrides) + (["data.skip_bad_records=True"] if args.skip_bad_records else [])
  cfg = load_config(args.config, overrides)
  check_config(cfg, args.stage)
  data = RecordData(cfg)
  stage = build_stage(cfg, args.stage, data)
  try:
    result = loop.train(cfg, stage, args.workdir, data, progress=not args.no_progress)
  except loop.TrainingDiverged as e:
    print(f"star-jax train: {e}", file=sys.stderr)
    return 1
  bad = result.metrics.get("bad_records")
  print(f"star-jax train: {args.stage} {result.status} at step {result.step}"
        + (f"; best {result.best}" if result.best else "")
        + (f"; skipped {bad} bad records" if bad else ""))
  return 0
