"""Mesh construction, rule mapping, directly-sharded init, and sharded == unsharded train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from star_jax import sharding
from star_jax.errors import UserError
from star_jax.models.layers import Dense, LayerNorm


class TinyMLP(nn.Module):
  """A two-layer MLP with logical annotations on every param."""

  @nn.compact
  def __call__(self, x):
    h = Dense(32, axes=("embed", "mlp"))(x)
    h = nn.gelu(h)
    h = Dense(16, axes=("mlp", "embed"))(h)
    return LayerNorm(axis="embed")(h)


EXPECTED = {  # param path -> mesh PartitionSpec under the test rules
    ("Dense_0", "kernel"): P("fsdp", "tensor"),
    ("Dense_0", "bias"): P("tensor"),
    ("Dense_1", "kernel"): P("tensor", "fsdp"),
    ("Dense_1", "bias"): P("fsdp"),
    ("LayerNorm_0", "scale"): P("fsdp"),
    ("LayerNorm_0", "bias"): P("fsdp"),
}


def _init(rng):
  return TinyMLP().init(rng, jnp.zeros((4, 16)))["params"]


def test_mesh_shape_fills_and_validates():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(UserError, match="needs 4 devices but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(UserError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(UserError, match="unknown axis"):
    sharding.mesh_shape({"model": 2}, 8)
  with pytest.raises(UserError, match="unknown mesh axis"):
    sharding.logical_rules([("embed", "model")])


def test_mesh_axes_are_auto(mesh222):
  assert mesh222.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh222.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh222.axis_types)


def test_init_is_directly_sharded(mesh222, rules):
  params, shardings = sharding.init_sharded(_init, mesh222, rules, jax.random.key(0))
  flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert set(flat) == set(EXPECTED)
  for path, leaf in flat.items():
    assert isinstance(leaf, jax.Array) and not isinstance(leaf, nn.LogicallyPartitioned)
    assert leaf.sharding.spec == EXPECTED[path], path
    assert leaf.sharding.is_equivalent_to(
        jax.tree_util.tree_leaves(shardings)[list(flat).index(path)], leaf.ndim)
    # no device holds the whole array: every shard is a strict part of it
    shard_shape = leaf.addressable_shards[0].data.shape
    assert np.prod(shard_shape) < leaf.size, path
  # values equal a plain unsharded init
  ref = nn.unbox(_init(jax.random.key(0)))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _make_step(optimizer):
  def loss_fn(params, batch):
    pred = TinyMLP().apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def test_sharded_train_step_equals_unsharded(mesh222, rules):
  optimizer = optax.adamw(1e-2)
  rng = np.random.default_rng(0)
  batch_np = {"x": rng.standard_normal((8, 16), np.float32), "y": rng.standard_normal((8, 16), np.float32)}
  step = _make_step(optimizer)

  # unsharded reference
  ref_params = nn.unbox(_init(jax.random.key(1)))
  ref_opt = optimizer.init(ref_params)
  ref_losses = []
  for _ in range(3):
    ref_params, ref_opt, loss = jax.jit(step)(ref_params, ref_opt, batch_np)
    ref_losses.append(float(loss))

  params, p_shard = sharding.init_sharded(_init, mesh222, rules, jax.random.key(1))
  opt_state = sharding.place_on_mesh(jax.jit(optimizer.init)(params), mesh222)
  o_shard = sharding.shardings_of(opt_state)
  batch = sharding.global_batch(batch_np, mesh222)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  b_shard = sharding.shardings_of(batch)
  sharded_step = jax.jit(step, in_shardings=(p_shard, o_shard, b_shard),
                         out_shardings=(p_shard, o_shard, sharding.replicated(mesh222)),
                         donate_argnums=(0, 1))
  losses = []
  for _ in range(3):
    params, opt_state, loss = sharded_step(params, opt_state, batch)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # Adam scales grad noise
  assert jax.tree_util.tree_leaves(params)[0].sharding.spec != P()


def test_batch_size_check(mesh222):
  sharding.check_batch_size(8, mesh222)
  with pytest.raises(UserError, match="not divisible by the data axes"):
    sharding.check_batch_size(6, mesh222)


def test_gather_fsdp_drops_only_fsdp_for_compute():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.logical_rules([("embed", "fsdp"), ("mlp", "tensor"), ("heads", ("fsdp", "tensor"))])
  kernel = jax.device_put(np.arange(64.0).reshape(8, 8), jax.NamedSharding(mesh, P("fsdp", "tensor")))
  assert sharding.gather_fsdp(kernel, ("embed", "mlp")) is kernel  # no mesh in context: untouched
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda k: sharding.gather_fsdp(k, ("embed", "mlp")) * 1.0)(kernel)
    heads = jax.jit(lambda k: sharding.gather_fsdp(k, ("heads", None)) * 1.0)(kernel)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(kernel))
  np.testing.assert_array_equal(np.asarray(heads), np.asarray(kernel))
  assert out.sharding.spec == P(None, "tensor")  # gathered over fsdp, still split over tensor
  assert heads.sharding.spec == P("tensor")
