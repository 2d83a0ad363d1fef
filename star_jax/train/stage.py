"""What the loop needs from a training stage, where its data comes from, and the stage registry.

A stage is plain functions, not a subclass: how to build its params (trainable and frozen), its pure
loss, which batch keys it reads, and optional hooks (load pretrained parts on a fresh start; evaluate
once per epoch). `build_stage(cfg, name)` returns the one selected by `--stage`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Protocol

import jax

from star_jax.errors import UserError

# stage name -> (module, its config section)
STAGES = {
    "vae": ("star_jax.train.vae", "vae_stage"),
    "tta": ("star_jax.train.tta", "tta"),
    "stage1": ("star_jax.train.stage1", "stage1"),
    "stage2": ("star_jax.train.stage2", "stage2"),
    "meanflow": ("star_jax.train.meanflow", "meanflow"),
}


class Data(Protocol):
  """Batches of numpy arrays with masks (star_jax.data.pipeline) and split sizes."""

  def iterator(self, split: str, *, batch_size: int, shuffle: bool, num_epochs: int | None,
               seed: int, drop_remainder: bool = True, random_crop: bool | None = None) -> Iterator[dict]:
    """A checkpointable (get_state/set_state) iterator over this process's part of `split`; `random_crop`:
    crop clips longer than the window at a random start (None: for the train split only)."""

  def num_examples(self, split: str) -> int:
    ...


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  hparams: Any                                   # the stage's config section (lr, batch_size, steps...)
  init: Callable[[jax.Array], dict]              # rng -> {'params': boxed tree, 'frozen': boxed tree}
  loss: Callable[..., tuple[jax.Array, dict]]    # (params, frozen, batch, rng) -> (loss, metrics)
  batch_keys: tuple[str, ...]                    # batch entries the step reads (others stay on host)
  load_pretrained: Callable[[Any], Any] | None = None  # TrainState -> TrainState, fresh runs only
  evaluate: Callable[..., dict] | None = None    # (state, data, mesh) -> metrics with 'score'; per epoch

  def total_steps(self, steps_per_epoch: int) -> int:
    """`steps`, else `epochs` (or `max_epochs`) × steps per epoch."""
    hp = self.hparams
    if hp.get("steps"):
      return int(hp.steps)
    epochs = hp.get("epochs") or hp.get("max_epochs")
    if not epochs:
      raise UserError(f"{self.name}: set steps or epochs in the config section")
    return int(epochs) * steps_per_epoch


class RecordData:
  """The records under `cfg.data.path` through the grain pipeline (star_jax.data.pipeline)."""

  def __init__(self, cfg: Any):
    from star_jax.data import records

    self.cfg = cfg
    self.info = records.read_info(cfg.data.path)

  def iterator(self, split, *, batch_size, shuffle, num_epochs, seed, drop_remainder=True, random_crop=None):
    from star_jax.data import pipeline

    return pipeline.make_iterator(
        self.cfg.data, split, batch_size=batch_size, audio_sample_rate_hz=self.cfg.vae.sample_rate_hz,
        seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=jax.process_index(),
        process_count=jax.process_count(), drop_remainder=drop_remainder, random_crop=random_crop)

  def num_examples(self, split):
    splits = self.info["splits"]
    if split not in splits:
      raise UserError(f"{self.cfg.data.path}: no split '{split}' (have {sorted(splits)})")
    value = splits[split]
    return int(value["num_examples"] if isinstance(value, dict) else value)

  @property
  def label_names(self) -> list[str]:
    return list(self.info["label_names"])


def build_stage(cfg: Any, name: str, data: Data | None = None) -> Stage:
  """The stage `name` for this config (`data` gives e.g. the label count when the config leaves it 0)."""
  if name not in STAGES:
    raise UserError(f"unknown stage '{name}'; choose one of {sorted(STAGES)}")
  module = importlib.import_module(STAGES[name][0])
  return module.build(cfg, data)


def stage_section(name: str) -> str:
  return STAGES[name][1]
