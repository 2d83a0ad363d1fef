"""How much does a trained stage 2 use its condition? Two measurements on the training split of a demo workdir.

  python scripts/research/stage2_condition_check.py outputs/demo [--cfg 1 3 6] [--clips 128]

1. Flow loss of the DiT at fixed noise levels σ with the spoken query's bridge tokens, a zero condition and the
   tokens of another clip (shuffled). The condition can only lower the loss where the noise hides the clip
   (σ near 1): a DiT that uses it shows a clear gap there.
2. Samples for training queries (single-event clips) against class means: each sample's nearest class-mean
   latent (time-resolved, over the cached VAE latents of the split) should be its query's class. Real latents
   give the ceiling; zero and shuffled conditions give chance.
Needs `stage2/` and `bundle/` (`star-jax demo` writes both) and the records' cached latents (`prepare cache`).
"""

import argparse
import os

import numpy as np

SIGMAS = (0.2, 0.5, 0.8, 0.95, 1.0)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir", help="a `star-jax demo` workdir (data/, stage2/, bundle/)")
  ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales to sample with")
  ap.add_argument("--clips", type=int, default=128, help="single-event training clips to sample for")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from star_jax import flow
  from star_jax.demo.run import split_arrays
  from star_jax.generate import Generator
  from star_jax.models import build

  gen = Generator(os.path.join(args.workdir, "bundle"))
  cfg = gen.cfg
  cfg.data.path = os.path.join(args.workdir, "data")
  cfg.data.sample_latents = False  # the posterior means
  data = split_arrays(cfg, "train", keys=("latents", "labels", "hubert", "hubert_mask"))
  x0 = data["latents"] * build.latent_scale(cfg)  # the DiT's space
  tokens = gen.tokens_from_features(data["hubert"], data["hubert_mask"])
  dit = lambda x, t, c: gen.dit.apply({"params": gen.params["dit"]}, x, t, c)

  @jax.jit
  def losses(x0_b, c_b, key):
    eps = jax.random.normal(key, x0_b.shape)
    rows = []
    for s in SIGMAS:
      xs, t = (1 - s) * x0_b + s * eps, jnp.full((x0_b.shape[0],), flow.T_SCALE * s)
      rows.append(jnp.stack([jnp.mean((dit(xs, t, c) - (eps - x0_b)) ** 2)
                             for c in (c_b, jnp.zeros_like(c_b), jnp.roll(c_b, 7, 0))]))
    return jnp.stack(rows)

  rng = np.random.default_rng(0)
  res = []
  for i in range(8):
    idx = rng.choice(len(x0), 64, replace=False)
    res.append(np.asarray(losses(x0[idx], tokens[idx], jax.random.PRNGKey(i))))
  print("flow loss at fixed σ        query   zero  shuffled  (gap to shuffled)")
  for s, (q, z, sh) in zip(SIGMAS, np.mean(res, 0)):
    print(f"  σ = {s:4.2f}               {q:6.3f} {z:6.3f}  {sh:6.3f}    {100 * (sh - q) / sh:5.1f} %")

  labels = data["labels"]
  single = labels.sum(1) == 1
  cls = labels.argmax(1)
  classes = np.unique(cls[single])
  means = np.stack([x0[single & (cls == c)].mean(0) for c in classes])

  def nearest_class_accuracy(lat, idx):
    d = ((lat[:, None] - means[None]) ** 2).mean((2, 3))
    return float(np.mean(classes[d.argmin(1)] == cls[idx]))

  idx = rng.choice(np.nonzero(single)[0], min(args.clips, int(single.sum())), replace=False)
  print(f"\nnearest class-mean latent of samples for {len(idx)} single-event training queries "
        f"({len(classes)} classes, chance {1 / len(classes):.3f})")
  print(f"  real latents                {nearest_class_accuracy(x0[idx], idx):.3f}")
  noise = jax.random.normal(jax.random.PRNGKey(0), x0[idx].shape)
  for w in args.cfg:
    for name, c in (("query", tokens[idx]), ("zero", np.zeros_like(tokens[idx])),
                    ("shuffled", np.roll(tokens[idx], 17, 0))):
      lat = np.asarray(flow.sample(gen.dit.apply, {"params": gen.params["dit"]}, noise, jnp.asarray(c),
                                   num_steps=int(cfg.flow.num_steps), cfg_scale=w, sway_coef=float(cfg.flow.sway_coef)))
      print(f"  CFG {w:g}, {name:9s}         {nearest_class_accuracy(lat, idx):.3f}")


if __name__ == "__main__":
  main()
