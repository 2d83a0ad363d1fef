"""Train state, optimizers and learning-rate schedules, the sharded state init, the pure train step and the
one jitted signature (shardings, donation) that the loop, `plan` and the throughput bench all compile.

Frozen sub-models (HuBERT, the Q-Former body, the VAE in stage 2; DESIGN.md §1) live in `state.frozen`:
saved and restored with the run, but outside the gradient and the optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from star_jax import checkpoint, sharding
from star_jax.errors import UserError

# (params, frozen, batch, rng) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
  step: jax.Array     # int32 scalar: optimizer steps taken
  params: Any         # trainable params (nested dict)
  opt_state: Any      # optax state of `params` only
  frozen: Any         # frozen sub-models: no gradient, no optimizer state
  ema: Any = None     # exponential moving average of `params`, or None


def make_schedule(hp: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The section's learning-rate schedule: linear warm-up, then `schedule` (constant | linear | cosine).

  Warm-up is `warmup_steps`, or `warmup_epochs` × steps_per_epoch (stage 1: 5 epochs, then linear decay
  to 0; stage 2: 1000 steps, then constant; DESIGN.md §2).
  """
  warmup = int(hp.get("warmup_steps", 0) or 0)
  if hp.get("warmup_epochs"):
    warmup = int(hp.warmup_epochs * steps_per_epoch)
  warmup = min(warmup, max(total_steps - 1, 0))
  kind = hp.get("schedule", "constant")
  lr = float(hp.lr)
  rest = max(total_steps - warmup, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "linear":
    after = optax.linear_schedule(lr, 0.0, rest)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, rest)
  else:
    raise UserError(f"unknown schedule '{kind}'; use constant, linear or cosine")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(hp: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (f32 moments) with weight decay and optional global-norm clipping (`grad_clip` > 0)."""
  parts = []
  if hp.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(hp.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(hp.get("b1", 0.9)), b2=float(hp.get("b2", 0.999)),
                           weight_decay=float(hp.get("weight_decay", 0.0))))
  return optax.chain(*parts)


def _opt_state_shardings(tx: optax.GradientTransformation, param_shapes: Any, param_shardings: Any,
                         mesh: Mesh) -> Any:
  """Moments follow their params' shardings; counters and other leaves are replicated."""
  opt_shapes = jax.eval_shape(tx.init, param_shapes)
  return optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_shardings,
                               transform_non_params=lambda _: sharding.replicated(mesh))


def state_layout(init_fn: Callable[[jax.Array], dict], tx: optax.GradientTransformation, mesh: Mesh,
                 rules: Any, rng: jax.Array, use_ema: bool) -> tuple[TrainState, TrainState]:
  """Abstract state and its shardings, without allocating -> (shapes, shardings), both TrainStates.

  `init_fn(rng)` returns {'params': boxed trainable tree, 'frozen': boxed frozen tree}.
  """
  boxed = jax.eval_shape(init_fn, rng)
  model_shardings = nn.unbox(sharding.tree_shardings(boxed, mesh, rules))
  shapes = nn.unbox(boxed)
  p_shapes, p_shard = shapes["params"], model_shardings["params"]
  rep = sharding.replicated(mesh)
  shape_state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=p_shapes,
      opt_state=jax.eval_shape(tx.init, p_shapes), frozen=shapes["frozen"],
      ema=p_shapes if use_ema else None)
  shard_state = TrainState(
      step=rep, params=p_shard, opt_state=_opt_state_shardings(tx, p_shapes, p_shard, mesh),
      frozen=model_shardings["frozen"], ema=p_shard if use_ema else None)
  return shape_state, shard_state


def init_state(init_fn: Callable[[jax.Array], dict], tx: optax.GradientTransformation, mesh: Mesh,
               rules: Any, rng: jax.Array, shardings: TrainState) -> TrainState:
  """A fresh state built directly in its sharded layout (`sharding.init_sharded`, then `tx.init`)."""
  model, _ = sharding.init_sharded(init_fn, mesh, rules, rng)
  params = model["params"]
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  ema = jax.jit(lambda p: p, out_shardings=shardings.params)(params) if shardings.ema is not None else None
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state, frozen=model["frozen"], ema=ema)


FROZEN_UPDATES = "frozen_updates"


def with_pretrained(state: TrainState, params: Any, frozen: Any) -> TrainState:
  """A fresh state with loaded weights: params and frozen replaced, the EMA (if kept) restarted at the params."""
  state = state.replace(params=params, frozen=frozen)
  if state.ema is not None:
    # A copy: the step donates params and EMA, and one buffer cannot be donated twice.
    state = state.replace(ema=jax.tree.map(lambda p, e: jax.device_put(p, e.sharding, may_alias=False),
                                           params, state.ema))
  return state


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float = 0.0, skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """`step(state, batch, rng) -> (state, metrics)`: pure; the rng is folded with the step number.

  Metrics always hold `loss`, `grad_norm`, `lr` and `finite` (loss and gradients finite). With
  `skip_nonfinite` a non-finite step leaves params, optimizer state and EMA unchanged (the step
  counter still advances, so the data and rng move on). A loss may return, under the metrics key
  FROZEN_UPDATES, new values for sub-trees of `frozen` (e.g. BatchNorm running statistics); the step writes them.
  """
  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen, batch, rng)
    aux = dict(aux)
    frozen = checkpoint.overlay(state.frozen, aux.pop(FROZEN_UPDATES, None))
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state, ema, frozen = keep((params, opt_state, ema, frozen),
                                            (state.params, state.opt_state, state.ema, state.frozen))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, frozen=frozen)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite.astype(jnp.float32), **aux}
    return new_state, metrics
  return step


@dataclasses.dataclass(frozen=True)
class StepSignature:
  """The train step jitted with its shardings and the state donated, and the abstract arguments it lowers on."""
  jitted: Any          # jax.jit(step, in_shardings, out_shardings, donate_argnums=0)
  args: tuple          # (state, batch, rng) as ShapeDtypeStructs with shardings

  def compile(self, mesh: Mesh, rules: Any):
    """Lower and compile ahead of time under the mesh and the logical-axis rules -> a jax Compiled."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return self.jitted.lower(*self.args).compile()


def train_step_with_signature(loss_fn: LossFn, hp: Any, nan_policy: str, tx: optax.GradientTransformation,
                              schedule: optax.Schedule, shapes: TrainState, shardings: TrainState,
                              batch_spec: dict[str, tuple], mesh: Mesh) -> StepSignature:
  """A stage's step as every caller compiles it (maxtext's get_functional_train_with_signature).

  `hp` gives `ema_decay`; `nan_policy` 'skip' keeps non-finite steps out of the state; `batch_spec` maps each
  batch key to its global (shape, dtype).
  """
  ema_decay = float(hp.get("ema_decay", 0.0) or 0.0)
  step = make_train_step(loss_fn, tx, schedule, ema_decay, nan_policy == "skip")
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in batch_spec}
  batch = {k: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=batch_shardings[k])
           for k, (shape, dtype) in batch_spec.items()}
  replicated = sharding.replicated(mesh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  return StepSignature(jitted, (state, batch, rng))
