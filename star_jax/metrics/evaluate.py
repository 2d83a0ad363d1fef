"""Score a folder of generated clips against a folder of references: STAR's Table 2 (FAD, FD, KL, IS, CLAP).

FAD: Fréchet distance of VGGish embeddings (every 0.96 s example of every clip). FD: Fréchet distance of
CNN14 2048-d clip embeddings. KL: KL(reference ‖ generated) of CNN14 softmax class distributions over
clips with the same file name. IS: inception score of the generated clips' CNN14 softmax. CLAP: mean
cosine between each generated clip and its caption. A metric whose model is absent, or whose inputs do
not allow it, is reported in `not_computed` with the reason instead of a value.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from star_jax.errors import UserError
from star_jax.metrics import scores
from star_jax.metrics.embedding import EmbeddingModel, list_audio, read_audio, resample

METRICS = ("FAD", "FD", "KL", "IS", "CLAP")
LOWER_IS_BETTER = {"FAD": True, "FD": True, "KL": True, "IS": False, "CLAP": False}
PAIRED_FRACTION = 0.99  # audioldm_eval's threshold for treating two folders as paired by file name


@dataclasses.dataclass
class Report:
  system: str
  values: dict[str, float | None]
  not_computed: dict[str, str]
  details: dict

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def read_captions(path: str) -> dict[str, str]:
  """A CSV with a header holding `caption` and `file` (or `id`) -> {file stem: caption}."""
  if not os.path.isfile(path):
    raise UserError(f"captions file '{path}' does not exist")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  key = next((k for k in ("file", "id") if rows and k in rows[0]), None)
  if not rows or key is None or "caption" not in rows[0]:
    raise UserError(f"'{path}' needs a header with 'caption' and 'file' (or 'id') columns")
  return {os.path.splitext(r[key])[0]: r["caption"] for r in rows}


def _embed_folder(directory: str, names: list[str], models: dict[str, EmbeddingModel], clap=None,
                  captions: dict[str, str] | None = None) -> dict:
  """Each model's (embeddings, logits) per clip, and CLAP cosines for the clips with a caption."""
  out = {name: [] for name in models}
  clap_cos, uncaptioned = [], 0
  for fname in names:
    wav, rate = read_audio(os.path.join(directory, fname))
    for key, model in models.items():
      out[key].append(model.embed(resample(wav, rate, model.sample_rate_hz)))
    if clap is not None:
      caption = captions.get(os.path.splitext(fname)[0])
      if caption is None:
        uncaptioned += 1
      else:
        clap_cos.append(clap.score([caption], [resample(wav, rate, clap.sample_rate_hz)])[0])
  return {"embeddings": out, "clap": clap_cos, "uncaptioned": uncaptioned}


def evaluate(generated: str, reference: str, cnn14: EmbeddingModel | None = None,
             vggish: EmbeddingModel | None = None, clap=None, captions: dict[str, str] | None = None,
             system: str | None = None, missing: dict[str, str] | None = None) -> Report:
  """Compute what the given models allow; `missing` maps a metric to why its model is absent."""
  gen_names, ref_names = list_audio(generated), list_audio(reference)
  not_computed = dict(missing or {})
  values: dict[str, float | None] = {m: None for m in METRICS}
  shared = sorted(set(gen_names) & set(ref_names))
  details: dict = {"generated": os.path.abspath(generated), "reference": os.path.abspath(reference),
                   "num_generated": len(gen_names), "num_reference": len(ref_names), "num_paired": len(shared)}
  models = {k: m for k, m in (("cnn14", cnn14), ("vggish", vggish)) if m is not None}
  if clap is not None and not captions:
    not_computed["CLAP"] = "no --captions CSV given"
    clap = None
  gen = _embed_folder(generated, gen_names, models, clap, captions)
  ref = _embed_folder(reference, ref_names, models) if models else {"embeddings": {}}

  def attempt(metric, fn):
    try:
      values[metric] = fn()
    except UserError as e:
      not_computed[metric] = str(e)

  if vggish is not None:
    attempt("FAD", lambda: scores.frechet_distance(
        np.concatenate([e for e, _ in gen["embeddings"]["vggish"]]),
        np.concatenate([e for e, _ in ref["embeddings"]["vggish"]])))
  if cnn14 is not None:
    gen_emb = np.concatenate([e for e, _ in gen["embeddings"]["cnn14"]])
    gen_logits = np.concatenate([lg for _, lg in gen["embeddings"]["cnn14"]])
    attempt("FD", lambda: scores.frechet_distance(
        gen_emb, np.concatenate([e for e, _ in ref["embeddings"]["cnn14"]])))
    is_mean, is_std = scores.inception_score(gen_logits)
    values["IS"] = is_mean
    details["IS_std"] = is_std
    if len(shared) > PAIRED_FRACTION * max(len(gen_names), len(ref_names)):
      gen_idx = {n: i for i, n in enumerate(gen_names)}
      ref_idx = {n: i for i, n in enumerate(ref_names)}
      ref_logits = np.concatenate([lg for _, lg in ref["embeddings"]["cnn14"]])
      kl = scores.kl_divergence(gen_logits[[gen_idx[n] for n in shared]], ref_logits[[ref_idx[n] for n in shared]])
      values["KL"] = kl["softmax"]
      details["KL_sigmoid"] = kl["sigmoid"]
    else:
      not_computed["KL"] = (f"KL needs clips paired by file name; {len(shared)} names are shared by "
                            f"{len(gen_names)} generated and {len(ref_names)} reference clips")
  if clap is not None:
    details["clap_clips"] = len(gen["clap"])
    if gen["uncaptioned"]:
      details["clap_uncaptioned"] = gen["uncaptioned"]
    if gen["clap"]:
      values["CLAP"] = float(np.mean(gen["clap"]))
    else:
      not_computed["CLAP"] = "no generated file name matches a caption in the CSV"
  return Report(system or os.path.basename(os.path.normpath(generated)), values, not_computed, details)


def format_table(reports: list[Report]) -> str:
  """A markdown table in the layout of STAR's Table 2, then the reasons for any missing value."""
  head = "| System | " + " | ".join(f"{m} {'↓' if LOWER_IS_BETTER[m] else '↑'}" for m in METRICS) + " |"
  lines = [head, "|---" * (len(METRICS) + 1) + "|"]
  for r in reports:
    cells = [("–" if r.values[m] is None else f"{r.values[m]:.3f}" if m == "CLAP" else f"{r.values[m]:.2f}")
             for m in METRICS]
    lines.append(f"| {r.system} | " + " | ".join(cells) + " |")
  for r in reports:
    lines += [f"{m} not computed: {why}" for m, why in r.not_computed.items()]
  return "\n".join(lines)
