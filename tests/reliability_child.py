"""`star-jax train` on the stand-in stage, in this process or a child one (for real SIGTERM/SIGKILL).

  python -m tests.reliability_child WORKDIR STEPS [--kill-in-save STEP:WHERE] [--step-delay S]

WHERE is `write` (inside the data iterator's write, while the state is still being written) or `finalize`
(everything written, just before orbax renames the temporary folder): the process SIGKILLs itself there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from tests.train_standin import ArrayData, standin_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--config", os.path.join(ROOT, "configs", "star.py") + ":tiny", "--stage", "tta", "--no-progress",
              "--set", "train.log_every_steps=1", "--set", "train.checkpoint_every_steps=2"]


class PoisonData(ArrayData):
  """ArrayData whose batch number `poison_step` (1-based: the batch of that step) is poisoned:
  'nan_loss' makes its inputs NaN, 'inf_grad' scales its gradients by Inf (the loss stays finite)."""

  def __init__(self, poison_step=0, kind="nan_loss", **kw):
    super().__init__(**kw)
    self.poison_step, self.kind = poison_step, kind

  def _poison(self, index, batch):
    gscale = np.ones(len(batch["x"]), np.float32)
    if index + 1 == self.poison_step:
      if self.kind == "nan_loss":
        batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
      else:
        gscale[:] = np.inf
    return {**batch, "gscale": gscale}

  def iterator(self, split, *, batch_size, shuffle, num_epochs, seed, drop_remainder=True, random_crop=None):
    ds = grain.MapDataset.range(len(self.x))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(lambda i: {"x": self.x[i], "y": self.y[i]})
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map_with_index(self._poison)
    return iter(ds.to_iter_dataset())


@jax.custom_vjp
def scale_grad(x, s):
  return x


def _scale_fwd(x, s):
  return x, s


def _scale_bwd(s, g):
  return jax.tree.map(lambda t: t * s, g), jnp.zeros_like(s)


scale_grad.defvjp(_scale_fwd, _scale_bwd)


def poison_stage(steps):
  """The stand-in stage, reading `gscale` too: its gradients are scaled by gscale[0]."""
  base = standin_stage(steps=steps)

  def loss(params, frozen, batch, rng):
    return base.loss(scale_grad(params, batch["gscale"][0]), frozen, batch, rng)

  return dataclasses.replace(base, loss=loss, batch_keys=base.batch_keys + ("gscale",))


def use_standin(setattr_fn, steps, data=None):
  """Make `star-jax train` build the stand-in stage on in-memory data (any --stage)."""
  from star_jax.train import stage as stage_lib
  setattr_fn(stage_lib, "RecordData", lambda cfg: data or PoisonData())
  setattr_fn(stage_lib, "build_stage", lambda cfg, name, data=None: poison_stage(steps))


def _kill_in_save(step: int, where: str) -> None:
  """SIGKILL this process in the middle of saving checkpoint `step`."""
  die = lambda: os.kill(os.getpid(), signal.SIGKILL)
  if where == "finalize":
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize

    async def finalize_or_die(self):
      if self._final_path.name == str(step):
        die()
      return await finalize(self)
    cls.finalize = finalize_or_die
  else:
    from grain._src.python.checkpoint import handler
    save = handler.CheckpointHandler.save

    def save_or_die(self, directory, *a, **kw):
      save(self, directory, *a, **kw)
      if directory.parent.name.startswith(f"{step}."):  # STEP.orbax-checkpoint-tmp-*/data
        die()
    handler.CheckpointHandler.save = save_or_die


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("steps", type=int)
  p.add_argument("--kill-in-save", default="")
  p.add_argument("--step-delay", type=float, default=0.0)
  args = p.parse_args()
  jax.config.update("jax_num_cpu_devices", 8)  # as tests/conftest.py: the same mesh, the same numbers
  jax.config.update("jax_platforms", "cpu")
  use_standin(setattr, args.steps)
  if args.kill_in_save:
    step, where = args.kill_in_save.split(":")
    _kill_in_save(int(step), where)
  if args.step_delay:  # slow steps, so a signal from outside lands mid-run
    from star_jax.train import loop
    train = loop.train
    loop.train = lambda *a, **kw: train(*a, on_step=lambda s: time.sleep(args.step_delay), **kw)
  from star_jax.cli import main as cli_main
  return cli_main(["train", "--workdir", args.workdir, *TRAIN_ARGS])


if __name__ == "__main__":
  sys.exit(main())
