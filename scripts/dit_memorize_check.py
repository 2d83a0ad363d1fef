"""Can the DiT of a config memorise K clips? A yardstick for stage 2's DiT, free of the bridge and the evaluator.

  python scripts/dit_memorize_check.py outputs/demo/data [--clips 4] [--steps 1000] [--set dit.abs_pe=sinusoidal]

Takes the cached VAE latents (`prepare cache`) of K single-event training clips of different classes, conditions
the DiT on one-hot class tokens, trains it with the config's flow loss for --steps, then samples 4 times per clip
and prints how often a sample lands nearest its own clip and its mean squared distance to it (next to the
distances between the clips). The latents are scaled to unit standard deviation, so distances compare across
VAEs. A DiT that cannot place K = 4 clips will not generate 63 classes.
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
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import optax
  from flax.core import meta

  from star_jax import flow
  from star_jax.config import load_config
  from star_jax.demo import split_arrays
  from star_jax.models.dit import DiT
  from star_jax.train import components

  cfg = load_config(args.config, [f"data.path={args.data}", *args.set])
  cfg.data.sample_latents = False  # the posterior means
  data = split_arrays(cfg, "train", keys=("latents", "labels"))
  single = np.nonzero(data["labels"].sum(1) == 1)[0]
  _, first = np.unique(data["labels"][single].argmax(1), return_index=True)  # one clip per class, in split order
  chosen = np.sort(single[first])[:args.clips]
  k = len(chosen)
  x = jnp.asarray(data["latents"][chosen])
  x = x / x.std()
  dit_cfg = components.dit_config(cfg)
  if k > dit_cfg.context_dim:
    raise SystemExit(f"--clips {k} needs one-hot tokens of at least {k} dims; the DiT's context is "
                     f"{dit_cfg.context_dim}")
  tokens = jnp.zeros((k, 4, dit_cfg.context_dim)).at[jnp.arange(k), :, jnp.arange(k)].set(3.0)
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
        dit.apply, {"params": p}, x[idx], tokens[idx], k_loss, **components.flow_loss_options(cfg)))(p)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  key, start = jax.random.PRNGKey(1), time.time()
  for _ in range(args.steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, sub)
  print(f"{k} clips, {args.steps} steps in {time.time() - start:.0f} s, last loss {float(loss):.3f}")
  between = np.asarray(((x[:, None] - x[None]) ** 2).mean((2, 3)))
  print(f"mean squared distance between the clips: {between[~np.eye(k, dtype=bool)].mean():.3f} "
        f"(min {between[~np.eye(k, dtype=bool)].min():.3f})")
  own = np.repeat(np.arange(k), 4)
  noise = jax.random.normal(jax.random.PRNGKey(5), (4 * k, *x.shape[1:]))
  for w in (1.0, float(cfg.flow.cfg_scale)):
    lat = flow.sample(dit.apply, {"params": params}, noise, jnp.repeat(tokens, 4, 0),
                      num_steps=int(cfg.flow.num_steps), cfg_scale=w, sway_coef=float(cfg.flow.sway_coef))
    d = np.asarray(((lat[:, None] - x[None]) ** 2).mean((2, 3)))
    print(f"CFG {w:g}: nearest its own clip {np.mean(d.argmin(1) == own):.2f}, "
          f"distance to it {d[np.arange(4 * k), own].mean():.3f}")


if __name__ == "__main__":
  main()
