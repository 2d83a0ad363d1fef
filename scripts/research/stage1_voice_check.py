"""Does a trained stage 1 hear the words or the voice? Its scores on voices it trained on and on the held-out one.

  python scripts/research/stage1_voice_check.py outputs/demo/stage1 --data outputs/demo/data

For the train split's single-event clips, the valid split (voices of the training pool, an unseen template) and the test
split's single-event clips spoken by the held-out voice:
  mAP          of the classifier head (the stage-1 objective)
  token acc    nearest class mean of the bridge tokens (class means from the training clips' tokens), the
               signal stage 2 conditions on; and the tokens' distance to their class mean (rms, per token value)
A bridge that learned the voices rather than the words scores far lower on the held-out voice than on valid.
"""

import argparse

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("stage1", help="a stage-1 train workdir (its best/ if it has one, else its last checkpoint)")
  ap.add_argument("--data", required=True, help="the prepared corpus (star-jax prepare opensfx)")
  ap.add_argument("--config", default="configs/star.py:tiny")
  args = ap.parse_args()

  from star_jax.config import load_config
  from star_jax.data import opensfx
  from star_jax.demo.run import split_arrays
  from star_jax.metrics.scores import mean_average_precision
  from star_jax import trained
  from star_jax.train import stage1
  from star_jax.train.stage import RecordData

  cfg = load_config(args.config, [f"data.path={args.data}"])
  num_classes = len(RecordData(cfg).label_names)
  params = trained.load_trained(args.stage1)[0]

  def run(split, single_only, voice=None):
    a = split_arrays(cfg, split, keys=("speech", "speech_mask", "labels", "id"))
    keep = np.ones(len(a["id"]), bool)
    if single_only:
      keep &= a["labels"].sum(-1) == 1
    if voice is not None:
      keep &= np.array([voice in str(i) for i in a["id"]])
    a = {k: v[keep] for k, v in a.items()}
    tokens, probs = stage1.classify(cfg, params, a["speech"], a["speech_mask"], num_classes)
    tokens = tokens.reshape(len(tokens), -1)
    return tokens, probs, a["labels"]

  train = run("train", True)
  cls = train[2].argmax(-1)
  means = np.stack([train[0][cls == c].mean(0) if (cls == c).any() else np.full(train[0].shape[1], np.inf)
                    for c in range(train[2].shape[1])])
  print(f"{'split':34s} {'clips':>5s} {'mAP':>6s} {'token acc':>9s} {'rms to mean':>11s}")
  for name, (tokens, probs, labels) in (
      ("train (single events)", train), ("valid (pool voices, new template)", run("valid", True)),
      (f"test, held-out voice {opensfx.TEST_VOICE.name}", run("test", True, opensfx.TEST_VOICE.tag))):
    y = labels.argmax(-1)
    d = ((tokens[:, None, :] - means[None]) ** 2).mean(-1)
    acc = float((d.argmin(-1) == y).mean())
    rms = float(np.sqrt(d[np.arange(len(y)), y].mean()))
    print(f"{name:34s} {len(y):5d} {mean_average_precision(labels, probs):6.3f} {acc:9.3f} {rms:11.3f}")


if __name__ == "__main__":
  main()
