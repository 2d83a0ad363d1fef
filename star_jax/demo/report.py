"""The demo's report: report.md with its tables, and spectrogram PNGs (real clip | generated | zero condition)."""

from __future__ import annotations

import os

import numpy as np


def log_mel_db(wav: np.ndarray, rate_hz: int, hop: int) -> np.ndarray:
  """What the demo's images show: a 64-band mel power spectrogram (n_fft 1024) in dB, 80 dB range -> (64, frames)."""
  import librosa
  mel = librosa.feature.melspectrogram(y=np.asarray(wav, np.float32), sr=rate_hz, n_fft=1024, hop_length=hop,
                                       n_mels=64)
  return librosa.power_to_db(mel, ref=1.0, top_db=80.0)


def spectrogram_png(path: str, real: np.ndarray, generated: np.ndarray, baseline: np.ndarray, rate_hz: int,
                     title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
  for ax, wav, name in zip(axes, (real, generated, baseline), ("real clip", "generated", "zero condition")):
    mel = log_mel_db(wav, rate_hz, hop=128)
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=max(mel.max(), -40))
    ax.set_title(name)
    ax.set_xlabel("frame")
  axes[0].set_ylabel("mel bin")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def report_md(r: dict, queries: dict, pngs: list[str], out_dir: str) -> str:
  s1 = r["stage1"]
  vae_aware = any("accuracy_vae_aware" in v for v in r["generation"].values())  # only with a trained VAE
  lines = [
      "# star-jax demo report", "",
      f"Config `{r['config']}` on {r['devices']} CPU device(s); {r['classes']} sound-event classes; "
      f"{r['queries']} held-out spoken test queries (unseen voice, and mixtures never seen in training).", "",
      "## Time", "",
      "| step | seconds |", "|---|---|",
      *[f"| {k.replace('_s', '')} | {v:.0f} |" for k, v in r["timings"].items()],
      *[f"| train {name} ({st['status']}, {st['step']} steps) | {st['seconds']:.0f} |"
        for name, st in r["stages"].items()], "",
      "## Stage 1: speech -> sound-event classifier", "",
      "| split | mAP | chance (random scores) |", "|---|---|---|",
      f"| test | {s1['test_mAP']:.3f} | {s1['chance_mAP']:.3f} |",
  ]
  if s1.get("best_valid"):
    lines.append(f"| valid (best epoch, step {s1['best_valid']['step']}) | {s1['best_valid']['mAP']:.3f} | |")
  if s1.get("checkpoint"):
    lines += ["", f"The test row and stage 2 use the {s1['checkpoint']}'s checkpoint (`stage1.keep_best`)."]
  lines += [
      "", "## Stage 2: generation from spoken queries", "",
      f"Scored by an evaluator classifier (log-mel statistics -> MLP) trained on the {r['evaluator_train_clips']} "
      "real training clips and degraded copies of them (gain, low-pass, noise, shift), so that it judges the "
      "event rather than the coding. Event accuracy: the evaluator's top class is one of the query's events. "
      "FD: Fréchet distance between evaluator embeddings of the clips and of the real test clips (lower is closer).",
      *(["", "The second accuracy column is an evaluator trained on the same clips and also on the VAE's "
        "reconstructions of them: it judges the event as the VAE renders it (every generated clip is a VAE decode)."]
        if vae_aware else []),
      "", "| audio | event accuracy | " + ("event accuracy, VAE-aware evaluator | " if vae_aware else "")
      + "FD to real |", "|---|---|" + ("---|" if vae_aware else "") + "---|",
      *[f"| {name} | {v['accuracy']:.3f} ({v['hits']}) | "
        + (f"{v['accuracy_vae_aware']:.3f} ({v['hits_vae_aware']}) | " if vae_aware else "")
        + f"{v['fd']:.2f} |" for name, v in r["generation"].items()],
      "", "The baselines are the same model and sampler with the bridge tokens replaced by zeros or by "
      "Gaussian noise of the same mean and scale, so the gap to them is what the spoken query contributes. "
      "The codec row encodes and decodes the real clips: no generated clip can score better than it. "
      "In brackets: how many of the clips hold their query's event.",
      "", "Spoken query against each baseline, paired over the same queries (exact one-sided McNemar test: "
      "among the queries where exactly one of the two clips holds the event, how often it is the query's; "
      "p is the chance of at least that many if the condition did not matter):", "",
      "| against | query only | baseline only | p |", "|---|---|---|---|",
      *[f"| {name} | {v['wins']} | {v['losses']} | {v['p_value']:.2g} |" for name, v in r["significance"].items()],
      "", "## Examples (real clip | generated | zero condition)", "",
  ]
  lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in pngs]
  lines += ["", "Generated wavs (and the spoken queries, `*.query.wav`) are in `wavs/`.", ""]
  return "\n".join(lines)
