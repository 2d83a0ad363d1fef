"""Train one stage (vae, tta, stage1, stage2) from a config; resumes from the workdir's checkpoints.

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


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="configs/star.py:tiny", help="FILE.py:VARIANT (default: %(default)s)")
  p.add_argument("--stage", required=True, choices=("vae", "tta", "stage1", "stage2"))
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set stage2.lr=1e-4 (repeatable)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
  distributed.add_distributed_arguments(p)


def setup_logging() -> None:
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
  logging.getLogger("star_jax").setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
  distributed.initialize_from_args(args)  # multi-host: before anything asks JAX for its devices
  from star_jax.config import load_config
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage

  setup_logging()
  cfg = load_config(args.config, args.overrides)
  data = RecordData(cfg)
  stage = build_stage(cfg, args.stage, data)
  try:
    result = loop.train(cfg, stage, args.workdir, data, progress=not args.no_progress)
  except loop.TrainingDiverged as e:
    print(f"star-jax train: {e}", file=sys.stderr)
    return 1
  print(f"star-jax train: {args.stage} {result.status} at step {result.step}"
        + (f"; best {result.best}" if result.best else ""))
  return 0
