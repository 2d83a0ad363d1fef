"""Q-Former / MLP bridge / classifier head: parity with transformers, STAR/LAVIS names, param counts,
gradients, and the encoder + bridge sharded on the test mesh equal to the unsharded run."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax import sharding
from star_jax.config import load_config
from star_jax.convert import qformer as convert
from star_jax.models.bridge import Classifier, MLPBridge, MLPBridgeConfig, QFormer, QFormerConfig
from star_jax.models.hubert import Hubert, HubertConfig

SPEECH_LENGTHS = (20, 13, 7)


def _tiny_hf(**kw):
  torch = pytest.importorskip("torch")
  from transformers import Blip2QFormerConfig, Blip2QFormerModel

  cfg = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             cross_attention_frequency=2, encoder_hidden_size=24)
  cfg.update(kw)
  torch.manual_seed(0)
  model = Blip2QFormerModel(Blip2QFormerConfig(**cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  queries = torch.randn(1, 5, cfg["hidden_size"])
  projection = torch.nn.Linear(cfg["hidden_size"], 40)
  return model, queries, projection


def _speech(dim=24):
  t = max(SPEECH_LENGTHS)
  x = np.random.default_rng(0).standard_normal((len(SPEECH_LENGTHS), t, dim)).astype(np.float32)
  mask = np.arange(t)[None] < np.array(SPEECH_LENGTHS)[:, None]
  return x, mask


def _torch_tokens(model, queries, projection, x, mask):
  import torch
  with torch.no_grad():
    out = model(query_embeds=queries.expand(x.shape[0], -1, -1), encoder_hidden_states=torch.from_numpy(x),
                encoder_attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    return (out if projection is None else projection(out)).numpy()


@pytest.mark.parametrize("with_projection", [True, False])
def test_qformer_parity_with_transformers_on_padded_speech(with_projection):
  model, queries, projection = _tiny_hf()
  projection = projection if with_projection else None
  x, mask = _speech()
  x_garbage = x.copy()
  x_garbage[~mask] = 1e3  # padded frames must not matter
  ref = _torch_tokens(model, queries, projection, x, mask)
  cfg, params = convert.from_torch(model, queries, projection)
  out = jax.jit(QFormer(cfg).apply)({"params": params}, jnp.asarray(x_garbage), jnp.asarray(mask))
  assert out.shape == ref.shape == (3, 5, 40 if with_projection else 32)
  assert np.abs(np.asarray(out) - ref).max() <= 1e-4


def _lavis_names(model, queries, projection, prefix="audio_"):
  """The transformers Q-Former state dict renamed the way STAR/LAVIS checkpoints spell it."""
  sd = {}
  for k, v in model.state_dict().items():
    k = k.replace("layernorm.", "embeddings.LayerNorm.").replace(".attention.attention.", ".attention.self.")
    sd[f"{prefix}Qformer.bert." + k.replace(".crossattention.attention.", ".crossattention.self.")] = v
  sd[f"{prefix}query_tokens"] = queries
  sd["hiddin_projection.weight"], sd["hiddin_projection.bias"] = projection.weight, projection.bias
  sd["projection.weight"], sd["projection.bias"] = projection.weight[:3], projection.bias[:3]  # stage-1 head
  return sd


def test_from_star_state_dict_matches_from_torch():
  model, queries, projection = _tiny_hf()
  ref_cfg, ref = convert.from_torch(model, queries, projection)
  cfg, params = convert.from_star_state_dict(_lavis_names(model, queries, projection), num_heads=4)
  assert cfg == dataclasses.replace(ref_cfg, dropout_rate=cfg.dropout_rate)
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
  num_classes, head = convert.classifier_from_star_state_dict(_lavis_names(model, queries, projection))
  assert num_classes == 3 and head["projection"]["kernel"].shape == (32, 3)


def test_convert_cli_from_star_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  model, queries, projection = _tiny_hf()
  torch.save(_lavis_names(model, queries, projection), tmp_path / "star.pt")
  from star_jax.checkpoint import load_params
  from star_jax.cli import main

  assert main(["convert", "qformer", "--from", str(tmp_path / "star.pt"), "--out", str(tmp_path / "ckpt"),
               "--num-heads", "4", "--dtype", "float32"]) == 0
  params, meta = load_params(str(tmp_path / "ckpt"))
  cfg = QFormerConfig(**meta["config"])
  x, mask = _speech()
  out = jax.jit(QFormer(cfg).apply)({"params": params}, jnp.asarray(x), jnp.asarray(mask))
  assert np.abs(np.asarray(out) - _torch_tokens(model, queries, projection, x, mask)).max() <= 1e-4


def test_paper_qformer_param_count_equals_transformers():
  torch = pytest.importorskip("torch")
  from transformers import Blip2QFormerConfig, Blip2QFormerModel

  cfg = QFormerConfig(**load_config("configs/star.py:paper").qformer.to_dict())
  hf = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                          cross_attention_frequency=2, encoder_hidden_size=1024, use_qformer_text_input=False)
  with torch.device("meta"):
    ref = sum(p.numel() for p in Blip2QFormerModel(hf).parameters())
  ref += 32 * 768 + (768 * 1024 + 1024)  # query tokens + the output projection
  shapes = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.key(0), jnp.zeros((1, 50, 1024))))["params"]
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == ref


def test_mlp_bridge_pools_valid_frames_and_updates_batch_stats():
  cfg = MLPBridgeConfig(**load_config("configs/star.py:tiny").mlp_bridge.to_dict())
  x, mask = _speech(cfg.input_size)
  bridge = MLPBridge(cfg)
  variables = jax.jit(bridge.init)(jax.random.key(0), jnp.asarray(x), jnp.asarray(mask))
  eval_out = bridge.apply(variables, jnp.asarray(x), jnp.asarray(mask))
  assert eval_out.shape == (3, 1, cfg.hidden_size)
  x_garbage = x.copy()
  x_garbage[~mask] = 1e3
  np.testing.assert_allclose(bridge.apply(variables, jnp.asarray(x_garbage), jnp.asarray(mask)), eval_out,
                             atol=1e-5)
  train_out, updates = bridge.apply(variables, jnp.asarray(x), jnp.asarray(mask), deterministic=False,
                                    rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
  assert train_out.shape == eval_out.shape and bool(jnp.isfinite(train_out).all())
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(moved))


def test_classifier_is_mean_over_tokens_then_linear():
  tokens = jax.random.normal(jax.random.key(0), (2, 4, 8))
  head = Classifier(num_classes=5)
  params = head.init(jax.random.key(1), tokens)["params"]
  logits = head.apply({"params": params}, tokens)
  p = nn.unbox(params)["projection"]
  np.testing.assert_allclose(logits, tokens.mean(1) @ p["kernel"] + p["bias"], atol=1e-5)
  with pytest.raises(ValueError, match="label count"):
    Classifier(num_classes=0).init(jax.random.key(1), tokens)


def test_classifier_prior_init_starts_every_class_at_the_prior():
  tokens = jax.random.normal(jax.random.key(0), (3, 4, 8))
  head = Classifier(num_classes=5, prior_prob=0.02)
  params = head.init(jax.random.key(1), tokens)["params"]
  np.testing.assert_allclose(jax.nn.sigmoid(nn.unbox(params)["projection"]["bias"]), 0.02, rtol=1e-5)
  # The kernel is the usual random init: the logits still depend on the tokens.
  assert float(jnp.std(head.apply({"params": params}, tokens))) > 0
  with pytest.raises(ValueError, match="prior_prob"):
    Classifier(num_classes=5, prior_prob=1.0).init(jax.random.key(1), tokens)


def test_cosine_classifier_is_scaled_cosine_of_the_mean_token_plus_a_prior_bias():
  tokens = jax.random.normal(jax.random.key(0), (3, 4, 8))
  head = Classifier(num_classes=5, prior_prob=0.02, cosine_scale=16.0)
  params = nn.unbox(head.init(jax.random.key(1), tokens)["params"])
  pooled, w = np.asarray(tokens.mean(1)), np.asarray(params["cosine_kernel"])
  cos = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
  np.testing.assert_allclose(head.apply({"params": params}, tokens), 16.0 * cos + params["cosine_bias"], atol=1e-5)
  np.testing.assert_allclose(jax.nn.sigmoid(params["cosine_bias"]), 0.02, rtol=1e-5)
  # Invariant to the pooled token's scale, unlike the linear head.
  np.testing.assert_allclose(head.apply({"params": params}, 3.0 * tokens), head.apply({"params": params}, tokens),
                             atol=1e-5)


def _tiny_speech_stack():
  c = load_config("configs/star.py:tiny")
  return Hubert(HubertConfig(**c.hubert.to_dict())), QFormer(QFormerConfig(**c.qformer.to_dict()))


def _init_stack(rng):
  hubert, qformer = _tiny_speech_stack()
  wav = jnp.zeros((4, 3200))
  hidden, mask = jax.eval_shape(lambda: hubert.init_with_output(rng, wav)[0])
  return {"hubert": hubert.init(rng, wav)["params"],
          "qformer": qformer.init(rng, jnp.zeros(hidden.shape), jnp.zeros(mask.shape, bool))["params"]}


def _stack_forward(params, wav_bt, mask_bt):
  hubert, qformer = _tiny_speech_stack()
  hidden, frame_mask = hubert.apply({"params": params["hubert"]}, wav_bt, mask_bt)
  return qformer.apply({"params": params["qformer"]}, hidden, frame_mask)


def _wav_batch():
  lengths = np.array([3200, 2500, 1900, 3000])
  wav = np.random.default_rng(2).standard_normal((4, 3200)).astype(np.float32) * 0.3
  mask = (np.arange(3200)[None] < lengths[:, None]).astype(np.float32)
  return wav * mask, mask


def test_gradients_through_encoder_and_bridge_are_finite():
  params = nn.unbox(jax.jit(_init_stack)(jax.random.key(0)))
  wav, mask = _wav_batch()
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(_stack_forward(p, wav, mask)))))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert float(sum(jnp.abs(g).sum() for g in leaves)) > 0
  assert float(jnp.abs(grads["hubert"]["feature_extractor"]["conv_0"]["kernel"]).sum()) > 0


def test_sharded_encoder_and_bridge_equal_unsharded(mesh222, rules):
  wav, mask = _wav_batch()
  ref = jax.jit(_stack_forward)(nn.unbox(jax.jit(_init_stack)(jax.random.key(0))), wav, mask)
  params, p_shard = sharding.init_sharded(_init_stack, mesh222, rules, jax.random.key(0))
  assert params["hubert"]["layer_0"]["feed_forward"]["intermediate_dense"]["kernel"].sharding.spec != ()
  batch = sharding.global_batch({"wav": wav, "mask": mask}, mesh222)
  with jax.set_mesh(mesh222), nn.logical_axis_rules(rules):
    out = jax.jit(_stack_forward, in_shardings=(p_shard, sharding.batch_sharding(mesh222),
                                                sharding.batch_sharding(mesh222)))(params, batch["wav"], batch["mask"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
