"""The ahead-of-time planner: per-device bytes fall as 1/F under FSDP, FLOPs and collectives are read."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from star_jax import plan, sharding
from star_jax.errors import UserError
from star_jax.models.layers import Dense

WIDTH = 256


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = x + Dense(4 * WIDTH, axes=("embed", "mlp"))(x)[..., :WIDTH]
    return x


def _plan_stack(mesh, rules, batch_size=8):
  """Plan an AdamW step of `Stack` on `mesh` from abstract state only."""
  optimizer = optax.adamw(1e-3)

  def init(rng):
    return Stack().init(rng, jnp.zeros((1, WIDTH)))["params"]

  # optax keeps flax's logical boxes, so the moments get their params' names and layout
  boxed_params = jax.eval_shape(init, jax.random.key(0))
  boxed_opt = jax.eval_shape(lambda k: optimizer.init(init(k)), jax.random.key(0))
  params, opt_state = (plan.abstract(nn.unbox(t), nn.unbox(sharding.tree_shardings(t, mesh, rules)))
                       for t in (boxed_params, boxed_opt))
  batch = jax.ShapeDtypeStruct((batch_size, WIDTH), jnp.float32, sharding=sharding.batch_sharding(mesh))

  def step(params, opt_state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(Stack().apply({"params": p}, x) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with nn.logical_axis_rules(rules):
    compiled = plan.compile_ahead(step, (params, opt_state, batch), donate_argnums=(0, 1))
  return plan.analyse(compiled, {"params": params, "optimizer": opt_state, "batch": batch}, mesh)


def test_fsdp_divides_params_and_optimizer(rules):
  plans = {f: _plan_stack(sharding.make_mesh({"data": 8 // f, "fsdp": f, "tensor": 1}), rules)
           for f in (1, 2, 4, 8)}
  base = plans[1].group_bytes["params"] + plans[1].group_bytes["optimizer"]
  assert plans[1].group_bytes["params"] == 4 * (WIDTH * 4 * WIDTH + 4 * WIDTH) * 4  # f32, unsharded
  for f, p in plans.items():
    held = p.group_bytes["params"] + p.group_bytes["optimizer"]
    assert held == pytest.approx(base / f, rel=0.2), f
    assert p.argument_bytes >= held
  assert plans[8].flops < plans[1].flops  # the AdamW update is sharded too
  gathers = [c for c in plans[8].collectives if c.op == "all-gather"]
  assert gathers and all(c.group_size == 8 for c in gathers)  # FSDP gathers the weights over fsdp
  assert not [c for c in plans[1].collectives if c.op == "all-gather"]


def test_prediction_and_report(rules):
  p = _plan_stack(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), rules)
  assert p.flops > 0 and p.temp_bytes >= 0
  for name, acc in plan.ACCELERATORS.items():
    pred = plan.predict(p, acc)
    assert pred.compute_s == pytest.approx(p.flops / acc.peak_flops)
    assert 0 < pred.mfu(p.flops) <= 1
    text = plan.report(p, pred, 8)
    assert "params" in text and "optimizer" in text and "MFU" in text and acc.name in text


def test_collective_parsing():
  hlo = """
  %ag = f32[1024,512]{1,0} all-gather(f32[256,512]{1,0} %p), channel_id=1, replica_groups=mesh['data'=2,'fsdp'=4,'tensor'=2] {'fsdp'}, dimensions={0}
  %ag2 = f32[256,1024]{1,0} all-gather(%param.2), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}
  %rs = bf16[128]{0} reduce-scatter(bf16[512]{0} %g), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
  %ar = (f32[10]{0}, f32[6]{0}) all-reduce(%a, %b), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %one = f32[10]{0} all-reduce(%c), replica_groups={{0},{1}}, to_apply=%add
  """
  found = plan.collectives_of(hlo)
  assert [(c.op, c.full_bytes, c.group_size, c.group_span) for c in found] == [
      ("all-gather", 1024 * 512 * 4, 4, 7), ("all-gather", 256 * 1024 * 4, 4, 4), ("reduce-scatter", 128 * 2 * 2, 2, 5),
      ("all-reduce", 16 * 4, 4, 4)]
  h100 = plan.ACCELERATORS["h100"]
  cross = plan.StepPlan({}, 16, {}, 0, 0, 0, 0, 0.0, 0.0, (plan.Collective("all-gather", 10**9, 16, 16),))
  within = dataclass_replace(cross, collectives=(plan.Collective("all-gather", 10**9, 8, 8),))
  assert plan.predict(cross, h100).collective_s > 5 * plan.predict(within, h100).collective_s


def dataclass_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def test_parse_mesh():
  assert plan.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(UserError, match="AXIS=SIZE"):
    plan.parse_mesh("model=2")
  with pytest.raises(UserError, match="AXIS=SIZE"):
    plan.parse_mesh("fsdp=-1")


def test_plan_compiles_the_step_the_loop_runs(tmp_path, mesh1, monkeypatch):
  """`plan` and the loop build their step with one function: the same lowered program, NaN-skip included."""
  from star_jax.config import load_config
  from star_jax.train import loop, stage, state as state_lib
  from tests.train_standin import RandomRecords

  class Compiling(Exception):
    """Raised where the loop would compile its step (the test needs the step, not a run)."""

  def stop_at_compile(signature, mesh, rules):
    raise Compiling(signature)

  small = ["data.audio_duration_s=0.32", "vae.kind=oobleck", "vae.channel_multiples=(1,2)", "vae.downsampling_ratios=(16,20)",
           "vae_stage.steps=1", "vae_stage.batch_size=8", "vae_stage.warmup_steps=0"]
  cfg = load_config("configs/star.py:tiny", small + ["train.nan_policy=skip"])
  monkeypatch.setattr(state_lib.StepSignature, "compile", stop_at_compile)
  data = RandomRecords(cfg, n=8)
  with pytest.raises(Compiling) as run:
    loop.train(cfg, stage.build_stage(cfg, "vae", data), str(tmp_path), data, mesh=mesh1, progress=False)
  planned = plan.stage_step(cfg, "vae", mesh1, 8)

  def text(signature):
    with jax.set_mesh(mesh1), nn.logical_axis_rules(planned.rules):
      return signature.jitted.lower(*signature.args).as_text()

  assert text(run.value.args[0]) == text(planned.signature)
  # The policy changes the program, so the equality above covers the flag.
  stop = load_config("configs/star.py:tiny", small + ["train.nan_policy=stop"])
  assert text(plan.stage_step(stop, "vae", mesh1, 8).signature) != text(planned.signature)
