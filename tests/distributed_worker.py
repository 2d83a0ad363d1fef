"""One process of the multi-process test (tests/test_distributed.py): join the job, train, print losses.

  python tests/distributed_worker.py --coordinator localhost:PORT --num-processes 2 --process-id I [--model stage2]

Each process feeds only its own rows of a fixed global batch; the losses must equal a one-process run's.
"""

from __future__ import annotations

import argparse
import json
import sys

DEVICES_PER_PROCESS = 2
GLOBAL_BATCH = 8
STEPS = 3
MESH = {"data": 1, "fsdp": 2, "tensor": 2}  # fsdp spans the two processes, tensor lies within each


def global_batch_np():
  import numpy as np
  rng = np.random.default_rng(0)
  return {"x": rng.standard_normal((GLOBAL_BATCH, 16), np.float32),
          "y": rng.standard_normal((GLOBAL_BATCH, 16), np.float32)}


def mlp_losses(devices) -> list[float]:
  """3 AdamW steps of a small FSDP+TP MLP on `devices`, each process feeding its own batch rows."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from star_jax import sharding
  from star_jax.models.layers import Dense, LayerNorm

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.gelu(Dense(64, axes=("embed", "mlp"))(x))
      return LayerNorm(axis="embed")(Dense(16, axes=("mlp", "embed"))(h))

  rules = sharding.logical_rules([("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor")])
  mesh = sharding.make_mesh(MESH, devices)
  params, p_shard = sharding.init_sharded(
      lambda k: MLP().init(k, jnp.zeros((1, 16)))["params"], mesh, rules, jax.random.key(0))
  optimizer = optax.adamw(1e-2)
  opt_state = sharding.place_on_mesh(jax.jit(optimizer.init)(params), mesh)
  o_shard = sharding.shardings_of(opt_state)

  def step(params, opt_state, batch, rng):
    noise = 0.1 * jax.random.normal(rng, batch["x"].shape)  # per-row randomness, as in flow matching

    def loss_fn(p):
      return jnp.mean((MLP().apply({"params": p}, batch["x"] + noise) - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  full = global_batch_np()
  rows = sharding.process_batch_rows(mesh, GLOBAL_BATCH)
  batch = sharding.global_batch({k: v[rows] for k, v in full.items()}, mesh)
  jstep = jax.jit(step, in_shardings=(p_shard, o_shard, sharding.shardings_of(batch), None),
                  out_shardings=(p_shard, o_shard, sharding.replicated(mesh)), donate_argnums=(0, 1))
  losses = []
  for i in range(STEPS):
    params, opt_state, loss = jstep(params, opt_state, batch, jax.random.fold_in(jax.random.key(1), i))
    losses.append(float(loss))
  return losses


def stage_batch_np(cfg, keys, cached: bool):
  """A fixed random global batch for a stage: waveforms, features and masks (padded tails) from seed 0."""
  import numpy as np
  from star_jax import plan
  rng = np.random.default_rng(0)
  out = {}
  for key, (shape, dtype) in plan.batch_spec(cfg, keys, GLOBAL_BATCH, cached).items():
    if dtype == "bool":  # example i keeps the first (1 - i/16) of its frames
      keep = (np.arange(shape[1])[None, :] < (shape[1] * (1 - np.arange(shape[0]) / 16))[:, None])
      out[key] = keep
    else:
      out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return out


def stage_losses(devices, mesh_sizes=MESH, stage_name="stage2", config="configs/star.py:tiny",
                 cached=True, steps=STEPS) -> list[float]:
  """`steps` train steps of a stage (star_jax.train) on a mesh over `devices`; each process feeds its rows."""
  import flax.linen as nn
  import jax

  from star_jax import sharding
  from star_jax.config import load_config
  from star_jax.train import stage as stage_lib, state as state_lib

  cfg = load_config(config)
  mesh = sharding.make_mesh(mesh_sizes, devices)
  rules = sharding.logical_rules(cfg.logical_axis_rules)
  stage = stage_lib.build_stage(cfg, stage_name)
  schedule = state_lib.make_schedule(stage.hparams, 10, 100)
  tx = state_lib.make_optimizer(stage.hparams, schedule)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(0))
  _, shardings = state_lib.state_layout(stage.init, tx, mesh, rules, init_rng, False)
  state = state_lib.init_state(stage.init, tx, mesh, rules, init_rng, shardings)
  full = stage_batch_np(cfg, stage.batch_keys, cached)
  rows = sharding.process_batch_rows(mesh, GLOBAL_BATCH)
  batch = sharding.global_batch({k: v[rows] for k, v in full.items()}, mesh)
  replicated = sharding.replicated(mesh)
  step = jax.jit(state_lib.make_train_step(stage.loss, tx, schedule),
                 in_shardings=(shardings, sharding.shardings_of(batch), replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)
  step_rng = jax.device_put(step_rng, replicated)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(steps):
      state, metrics = step(state, batch, step_rng)
      losses.append(float(metrics["loss"]))
  return losses


def main(argv=None) -> int:
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  from star_jax import distributed

  parser = argparse.ArgumentParser()
  parser.add_argument("--model", choices=("mlp", "stage2"), default="mlp",
                      help="mlp: a small FSDP+TP MLP; stage2: the tiny config's stage-2 step")
  distributed.add_distributed_arguments(parser)
  args = parser.parse_args(argv)
  group = distributed.initialize_from_args(args)
  assert jax.process_count() == group.num_processes and jax.process_index() == group.process_id
  assert len(jax.devices()) == DEVICES_PER_PROCESS * group.num_processes
  losses = mlp_losses(jax.devices()) if args.model == "mlp" else stage_losses(jax.devices())
  print("RESULT " + json.dumps({"process_id": jax.process_index(), "losses": losses}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
