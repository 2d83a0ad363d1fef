"""Train (or resume) a tiny `vae` stage, then score its reconstructions with the demo's evaluator.

  python scripts/research/vae_recon_eval.py WORKDIR --data outputs/demo/data [--set vae_stage.steps=1200 ...]

The demo's generated audio can score no better than the VAE's reconstructions, so this is the quick way to
compare VAE settings (docs/notes/tiny_demo.md). Prints the event accuracy of the real test queries and of their
reconstructions, and the reconstructions' Fréchet distance to the real clips in the evaluator's space.
"""

import argparse
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir")
  ap.add_argument("--data", default="outputs/demo/data", help="a prepared OpenSFX corpus")
  ap.add_argument("--config", default="configs/star.py:tiny")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--queries", type=int, default=96)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from star_jax.demo.evaluator import Evaluator, event_accuracy
  from star_jax.demo.run import split_arrays
  from star_jax.config import load_config
  from star_jax.metrics.scores import frechet_distance
  from star_jax.models.vae import OobleckVAE
  from star_jax import trained
  from star_jax.models import build
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage
  from star_jax.train.vae import fit_length

  cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
  data = RecordData(cfg)
  start = time.time()
  res = loop.train(cfg, build_stage(cfg, "vae", data), args.workdir, data)
  print(f"vae: {res.status} at step {res.step} in {time.time() - start:.0f} s")

  vae = OobleckVAE(build.vae_config(cfg))
  params = trained.load_trained(args.workdir)[0]["vae"]
  recon_fn = jax.jit(lambda p, x: fit_length(vae.apply({"params": p}, x, None)[0], x.shape[1]))
  queries = split_arrays(cfg, "test", args.queries)
  audio, labels = queries["audio"], queries["labels"]
  recon = np.concatenate([np.asarray(recon_fn(params, jnp.asarray(audio[i:i + 16])))
                          for i in range(0, len(audio), 16)])
  train = split_arrays(cfg, "train")
  evaluator = Evaluator(cfg.vae.sample_rate_hz).fit(train["audio"], train["labels"])
  real_emb = evaluator.embed(audio)
  print(f"event accuracy: real {event_accuracy(evaluator, audio, labels):.3f}, "
        f"reconstructed {event_accuracy(evaluator, recon, labels):.3f}; "
        f"FD of the reconstructions {frechet_distance(evaluator.embed(recon), real_emb):.1f}; "
        f"rms real {np.sqrt(np.mean(audio ** 2)):.3f}, reconstructed {np.sqrt(np.mean(recon ** 2)):.3f}")


if __name__ == "__main__":
  main()
