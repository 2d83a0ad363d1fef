"""One process of a multi-process `loop.train` run of a stage of the (smaller) tiny config on fixed random
records, batched globally (tests/train_standin.GlobalBatches), so N processes equal one.

  DEVICES=4 launch/local.sh 2 python tests/train_worker.py WORKDIR STAGE [--step-delay S] [KEY=VALUE ...]

Prints `RESULT {json}` (status, step, best). A SIGTERM to any process makes them all save one step and
exit 0 (JAX's preemption sync point); running the same command again resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config made smaller still (compile time dominates), as tests/test_train_stages.py.
SMALL = ["data.speech_duration_s=0.5", "data.audio_duration_s=0.32", "train.log_every_steps=1",
         "train.checkpoint_every_steps=4", "hubert.num_layers=1", "hubert.conv_dim=(16,16)",
         "dit.depth=2", "vae.channel_multiples=(1,2)", "vae.downsampling_ratios=(16,20)", "qformer.num_layers=1"]
STAGE_ARGS = {  # 6 steps of 8 over 16 records: 2 steps per epoch, a save at step 4, 3 epoch boundaries
    "vae": ["vae_stage.steps=6", "vae_stage.batch_size=8", "vae.kind=oobleck"],  # tiny's mel codec: fixed
    "tta": ["tta.steps=6", "tta.batch_size=8"],
    "stage1": ["stage1.max_epochs=3", "stage1.batch_size=8", "stage1.keep_best=True", "stage1.patience_epochs=2"],
    "stage2": ["stage2.steps=6", "stage2.batch_size=8"],
    "standin": ["train.checkpoint_every_steps=2"],
}
# Stage 2 and tta read cached HuBERT frames and latents (`star-jax prepare cache`), as a pod run does, so a step leaves
# out HuBERT and the codec; the online path is tests/test_train_stages.py's.
CACHED = ("stage2", "tta")
VALID_EXAMPLES = 11  # the last validation batch: 3 rows, so one process of two has none


def make_run(stage_name: str, overrides=()):
  """(cfg, stage, data) for `stage_name` on this process's mesh; 'standin' is tests/train_standin's stage
  (12 steps, a save every 2), for the signal tests where the model does not matter."""
  from star_jax import sharding
  from star_jax.config import load_config
  from star_jax.train.stage import build_stage
  from tests.train_standin import ArrayData, GlobalBatches, RandomRecords, standin_stage

  cfg = load_config(os.path.join(ROOT, "configs", "star.py") + ":tiny",
                    SMALL + STAGE_ARGS[stage_name] + list(overrides))
  if stage_name == "standin":
    arrays = ArrayData()
    examples = [{"x": x, "y": y} for x, y in zip(arrays.x, arrays.y)]
    return cfg, standin_stage(steps=12), GlobalBatches({"train": examples}, sharding.make_mesh(cfg.mesh.to_dict()))
  records = RandomRecords(cfg, n=16, cached=stage_name in CACHED)
  data = GlobalBatches({"train": records.examples, "valid": records.examples[:VALID_EXAMPLES]},
                       sharding.make_mesh(cfg.mesh.to_dict()), records.label_names)
  return cfg, build_stage(cfg, stage_name, data), data


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("stage", choices=sorted(STAGE_ARGS))
  p.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (signal tests)")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args(argv)
  from star_jax import distributed
  distributed.initialize()
  print(f"PID {os.getpid()}", flush=True)
  from star_jax.train import cli, loop

  cli.setup_logging()
  cfg, stage, data = make_run(args.stage, args.overrides)
  delay = (lambda s: time.sleep(args.step_delay)) if args.step_delay else None
  result = loop.train(cfg, stage, args.workdir, data, progress=False, on_step=delay)
  import jax
  print("RESULT " + json.dumps({"process": jax.process_index(), "status": result.status, "step": result.step,
                                "best": result.best}), flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
