"""TFDS builders of the prepared datasets: features, splits, version, description, citation and credits.

`star-jax prepare` renders a split's shards in parallel and resumably (star_jax.data.shards) straight into the
layout these builders define, then `finish` writes dataset_info.json from the shards' sidecars, listing each
split whose shards are all there. TFDS's own `download_and_prepare` would write the same dataset, but its
generator path runs in one process and restarts a split from scratch when interrupted (its parallel path needs
Apache Beam); `Opensfx` still supports it for the built-in corpus. Readers need neither this module nor
TensorFlow: `tfds.builder_from_directory(DIR/<name>/<version>)` rebuilds the features from features.json.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import tensorflow_datasets as tfds

from star_jax.data import records

VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "Records as tf.train.Example in array_record files (before: NPZ records and info.json)."}

with tfds.core.registered.skip_registration():
  class _Prepared(tfds.core.GeneratorBasedBuilder):
    """A dataset `star-jax prepare` writes; `metadata` is what the pipeline reads beside the records."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = RELEASE_NOTES
    DESCRIPTION = ""
    HOMEPAGE = "https://github.com/star-jax/star-jax"
    CITATION = ""
    LICENSE = ""

    def __init__(self, *, metadata: dict[str, Any] | None = None, **kwargs):
      self._metadata = dict(metadata or {})
      super().__init__(**kwargs)

    def _features(self):
      return records.features("records", dim=int(self._metadata.get("text_dim", 0)))

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=self._features(),
                                   homepage=self.HOMEPAGE, citation=self.CITATION,
                                   metadata=tfds.core.MetadataDict(self._metadata),
                                   redistribution_info=dict(license=self.LICENSE) if self.LICENSE else None)

    def _split_generators(self, dl_manager):
      raise NotImplementedError(f"{self.name}: build it with `star-jax prepare`")

    def _generate_examples(self, *args):
      raise NotImplementedError(f"{self.name}: build it with `star-jax prepare`")

  class _Cached(_Prepared):
    """Cached frozen-model features of a corpus: the same splits and shards as the corpus, record for record."""

    FIELD = ""

    def _features(self):
      m = self._metadata
      return records.features(self.FIELD, m.get("dtype", "float32"), int(m.get(records.DIM_KEYS[self.FIELD], 0)))


class Opensfx(_Prepared):
  """OpenTTD's OpenSFX recordings with spoken captions (star_jax.data.opensfx)."""

  DESCRIPTION = ("71 labelled sound-effect recordings from Debian's openttd-opensfx package, captions from their "
                 "class names and two-event mixtures, each spoken by espeak-ng voices (DESIGN.md §4).")
  CITATION = """@misc{opensfx, title={OpenSFX: a free sound set for OpenTTD}, author={{OpenSFX contributors}},
  howpublished={\\url{https://github.com/OpenTTD/OpenSFX}}}"""
  LICENSE = ("OpenSFX as a whole: CC BY-SA 3.0; per recording CC0 1.0, CC BY 3.0 or CC BY-SA 3.0 (the metadata's "
             "`credits` name each recording's authors and licence)")

  def _split_generators(self, dl_manager):
    """TFDS's own one-process build (`star-jax prepare opensfx` writes the same records in parallel)."""
    from star_jax.data import opensfx

    _, specs = opensfx.plan(opensfx.read_cat(self._metadata.get("cat", opensfx.CAT_PATH)))
    return {split: self._generate_examples(split_specs) for split, split_specs in specs.items()}

  def _generate_examples(self, specs):
    from star_jax.data import opensfx

    m = self._metadata
    opensfx.init_worker(m.get("cat", opensfx.CAT_PATH), m["audio_sample_rate_hz"], m["speech_sample_rate_hz"],
                        m["text_dim"])
    for spec in specs:
      [record], _, _ = opensfx.build_records([spec])
      yield record["id"], record


class Audiocaps(_Prepared):
  """AudioCaps captions and clips, AudioSet labels, synthesised speech (star_jax.data.audiocaps). Extra fields
  (e.g. text-encoder features) extend `_features` and the records of `audiocaps.build_records`."""

  DESCRIPTION = ("AudioCaps clips with their first (or every) caption spoken by a TTS voice, multi-hot AudioSet "
                 "labels (DESIGN.md §4). Built from the user's own downloads by `star-jax prepare audiocaps`.")
  HOMEPAGE = "https://audiocaps.github.io/"
  CITATION = """@inproceedings{kim2019audiocaps, title={AudioCaps: Generating Captions for Audios in The Wild},
  author={Kim, Chris Dongjoo and Kim, Byeongchang and Lee, Hyunmin and Kim, Gunhee}, booktitle={NAACL-HLT},
  year={2019}}"""
  LICENSE = "AudioCaps captions: MIT; the clips are the user's own copies of YouTube videos (AudioSet, CC BY 4.0 labels)"


class CachedHubert(_Cached):
  """HuBERT frames of each record's speech (`star-jax prepare cache --hubert`)."""
  FIELD = "hubert"
  DESCRIPTION = "HuBERT last_hidden_state of each record's speech, valid frames only; metadata: settings per split."


class CachedLatents(_Cached):
  """VAE posteriors of each record's audio (`star-jax prepare cache --vae`)."""
  FIELD = "latents"
  DESCRIPTION = "VAE posterior mean and std of each record's audio; metadata: settings per split."


BUILDERS = {"opensfx": Opensfx, "audiocaps": Audiocaps, "cached_hubert": CachedHubert, "cached_latents": CachedLatents}


def make(name: str, out: str, metadata: dict[str, Any] | None = None, **kwargs) -> _Prepared:
  """Builder `name` writing under `out` (its version directory: `.data_dir`)."""
  return BUILDERS[name](data_dir=out, file_format=records.SHARD_FORMAT, metadata=metadata, **kwargs)


def _sidecar(shard: str) -> dict | None:
  try:
    with open(shard + ".json") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def complete_splits(version_dir: str) -> dict[str, list[int]]:
  """{split: records per shard} of every split whose shards all have their sidecar."""
  name = os.path.basename(os.path.dirname(version_dir))
  pattern = re.compile(rf"{re.escape(name)}-(.+)\.{records.SHARD_FORMAT}-(\d{{5}})-of-(\d{{5}})$")
  splits: dict[str, dict] = {}
  for file in sorted(os.listdir(version_dir)):
    m = pattern.match(file)
    if m:
      splits.setdefault(m.group(1), {"count": int(m.group(3)), "done": {}})
      sidecar = _sidecar(os.path.join(version_dir, file))
      if sidecar is not None:
        splits[m.group(1)]["done"][int(m.group(2))] = int(sidecar["records"])
  return {s: [v["done"][i] for i in range(v["count"])] for s, v in splits.items()
          if len(v["done"]) == v["count"]}


def finish(builder: _Prepared) -> dict[str, int]:
  """Writes dataset_info.json (features, metadata, every complete split) -> {split: records}."""
  version_dir = builder.data_dir
  template = tfds.core.ShardedFileTemplate(data_dir=version_dir, dataset_name=builder.name,
                                           filetype_suffix=records.SHARD_FORMAT)
  splits = complete_splits(version_dir)
  infos = []
  for split, lengths in sorted(splits.items()):
    size = sum(os.path.getsize(p) for p in records.shard_paths(version_dir, split))
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=size,
                                     filename_template=template.replace(split=split)))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(version_dir)
  return {s: sum(n) for s, n in splits.items()}
