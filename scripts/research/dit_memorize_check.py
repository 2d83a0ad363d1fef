"""Can the DiT of a config memorise K clips? A yardstick for stage 2's DiT, free of the evaluator.

  python scripts/research/dit_memorize_check.py outputs/demo/data [--clips 4] [--steps 1000] [--set dit.abs_pe=sinusoidal]
  python scripts/research/dit_memorize_check.py outputs/demo/data --records single --tokens bridge --bundle outputs/demo/bundle

Takes the cached VAE latents (`prepare cache`) of K single-event training clips of different classes (--records
first), or of every single-event training record (--records single: ~13 per class, several clips for some
classes), conditions the DiT on class tokens, trains it with the config's flow loss for --steps, then samples 4
times for the first clip of each class and prints how often a sample lands nearest its class's mean latent (and,
for --records first, its mean squared distance to its own clip, next to the distances between the clips). The
latents are scaled to unit standard deviation, so distances compare across VAEs.

--tokens: onehot (a 3 in the class's dimension, 4 tokens), random (a fixed Gaussian 8-token code per class) or
bridge (the bundle's bridge tokens of each record's spoken caption, from the cached HuBERT frames). The gap
between random and bridge is what the bridge's token geometry costs the DiT.
"""

import argparse
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("data", help="records with cached latents (a demo workdir's data/)")
  ap.add_argument("--config", default="configs/star.py:tiny")
  ap.add_argument("--clips", type=int, default=4, help="how many clips (one per class) to memorise")
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  ap.add_argument("--records", choices=("first", "single"), default="first",
                  help="first: one clip per class (K of them); single: every single-event record")
  ap.add_argument("--tokens", choices=("onehot", "random", "bridge"), default="onehot")
  ap.add_argument("--bundle", default="", help="an exported bundle (a demo's bundle/) for --tokens bridge")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import optax
  from flax.core import meta

  from star_jax import flow
  from star_jax.config import load_config
  from star_jax.demo.run import split_arrays
  from star_jax.models.dit import DiT
  from star_jax.models import build

  cfg = load_config(args.config, [f"data.path={args.data}", *args.set])
  cfg.data.sample_latents = False  # the posterior means
  if args.tokens == "bridge" and not args.bundle:
    raise SystemExit("--tokens bridge needs --bundle (a demo workdir's bundle/)")
  keys = ("latents", "labels") + (("hubert", "hubert_mask") if args.tokens == "bridge" else ())
  data = split_arrays(cfg, "train", keys=keys)
  single = np.nonzero(data["labels"].sum(1) == 1)[0]
  _, first = np.unique(data["labels"][single].argmax(1), return_index=True)  # one clip per class, in split order
  probes = np.sort(single[first])[:args.clips] if args.records == "first" else np.sort(single[first])
  chosen = probes if args.records == "first" else single
  k = len(chosen)
  classes = data["labels"][chosen].argmax(1)
  x = jnp.asarray(data["latents"][chosen])
  x = x / x.std()
  dit_cfg = build.dit_config(cfg)
  if args.tokens == "onehot":
    if data["labels"].shape[1] > dit_cfg.context_dim:
      raise SystemExit(f"one-hot tokens need {data['labels'].shape[1]} dims; the DiT's context is "
                       f"{dit_cfg.context_dim}: use --tokens random")
    tokens = jnp.zeros((k, 4, dit_cfg.context_dim)).at[jnp.arange(k), :, classes].set(3.0)
  elif args.tokens == "random":
    codes = np.random.default_rng(0).standard_normal((data["labels"].shape[1], 8, dit_cfg.context_dim))
    tokens = jnp.asarray(codes[classes], jnp.float32)
  else:
    from star_jax.generate import Generator
    gen = Generator(args.bundle)
    tokens = gen.tokens_from_features(data["hubert"][chosen], data["hubert_mask"][chosen])
    means = np.stack([tokens[classes == c].mean(0).ravel() for c in np.unique(classes)])
    tokens = jnp.asarray(tokens)
    sv = np.linalg.svd(means - means.mean(0), compute_uv=False) ** 2
    print(f"bridge tokens: class means span a participation rank of {sv.sum() ** 2 / (sv ** 2).sum():.1f} "
          f"dimensions ({len(means)} classes)")
  dit = DiT(dit_cfg)
  params = meta.unbox(dit.init(jax.random.PRNGKey(0), x[:1], jnp.zeros((1,)), tokens[:1]))["params"]
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(optax.linear_schedule(0.0, args.lr, 50), weight_decay=0.01))
  opt_state = opt.init(params)

  @jax.jit
  def step(p, o, key):
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (args.batch_size,), 0, k)
    loss, g = jax.value_and_grad(lambda p: flow.flow_matching_loss(
        dit.apply, {"params": p}, x[idx], tokens[idx], k_loss, **build.flow_loss_options(cfg)))(p)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  key, start = jax.random.PRNGKey(1), time.time()
  for _ in range(args.steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, sub)
  print(f"{k} records ({args.tokens} tokens), {args.steps} steps in {time.time() - start:.0f} s, "
        f"last loss {float(loss):.3f}")
  pos = np.searchsorted(chosen, probes)  # the probes' rows in x
  if args.records == "first":
    between = np.asarray(((x[:, None] - x[None]) ** 2).mean((2, 3)))
    print(f"mean squared distance between the clips: {between[~np.eye(k, dtype=bool)].mean():.3f} "
          f"(min {between[~np.eye(k, dtype=bool)].min():.3f})")
  names = np.unique(classes)
  class_means = jnp.stack([x[classes == c].mean(0) for c in names])
  own = np.repeat(classes[pos], 4)
  noise = jax.random.normal(jax.random.PRNGKey(5), (4 * len(pos), *x.shape[1:]))
  for w in (1.0, float(cfg.flow.cfg_scale)):
    lat = flow.sample(dit.apply, {"params": params}, noise, jnp.repeat(tokens[pos], 4, 0),
                      num_steps=int(cfg.flow.num_steps), cfg_scale=w, sway_coef=float(cfg.flow.sway_coef))
    to_means = np.asarray(((lat[:, None] - class_means[None]) ** 2).mean((2, 3)))
    line = f"CFG {w:g}: nearest its class mean {np.mean(names[to_means.argmin(1)] == own):.2f}"
    if args.records == "first":
      line += f", distance to its own clip {float(((lat - jnp.repeat(x[pos], 4, 0)) ** 2).mean()):.3f}"
    print(line)


if __name__ == "__main__":
  main()
