"""HuBERT: parity with transformers (both variants, padded batches), converters, param counts, CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from star_jax.convert import hubert as convert
from star_jax.models.hubert import Hubert, HubertConfig, frame_lengths, min_input_length, strided_conv

LENGTHS = (4000, 3100, 2345)  # three utterances of different lengths, right-padded


def _tiny_hf(stable: bool, **kw):
  """A tiny random transformers HubertModel; `stable` = the hubert-large layout, else hubert-base."""
  torch = pytest.importorskip("torch")
  from transformers import HubertConfig as HFConfig, HubertModel

  cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             conv_dim=(16, 24, 24), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=stable,
             feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
             num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, mask_time_prob=0.0)
  cfg.update(kw)
  torch.manual_seed(0)
  model = HubertModel(HFConfig(**cfg)).eval()
  with torch.no_grad():  # non-trivial norms and biases, not just their ones/zeros init
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _batch():
  t = max(LENGTHS)
  wav = np.random.default_rng(0).standard_normal((len(LENGTHS), t)).astype(np.float32)
  mask = (np.arange(t)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
  return wav * mask, mask


def _torch_hidden(model, wav, mask):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(wav), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


@pytest.mark.parametrize("stable", [False, True], ids=["base", "large"])
def test_parity_with_transformers_on_padded_batch(stable):
  model = _tiny_hf(stable)
  wav, mask = _batch()
  ref = _torch_hidden(model, wav, mask)
  cfg, params = convert.from_torch(model)
  hidden, frame_mask = jax.jit(Hubert(cfg).apply)({"params": params}, jnp.asarray(wav), jnp.asarray(mask))
  hidden, frame_mask = np.asarray(hidden), np.asarray(frame_mask)
  assert hidden.shape == ref.shape
  expected_frames = np.asarray(frame_lengths(cfg, jnp.asarray(LENGTHS)))
  np.testing.assert_array_equal(frame_mask.sum(1), expected_frames)
  assert np.abs(hidden - ref)[frame_mask].max() <= 1e-4
  assert np.all(hidden[~frame_mask] == 0)


def test_bf16_compute_stays_close_to_f32():
  model = _tiny_hf(True, conv_dim=(16, 128, 128))  # wide enough for the per-block matmul path
  wav, mask = _batch()
  cfg, params = convert.from_torch(model)
  ref = _torch_hidden(model, wav, mask)
  cfg16 = HubertConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
  hidden, frame_mask = jax.jit(Hubert(cfg16).apply)({"params": params}, jnp.asarray(wav), jnp.asarray(mask))
  assert hidden.dtype == jnp.float32
  err = np.abs(np.asarray(hidden) - ref)[np.asarray(frame_mask)].max()
  assert err <= 3e-2 * np.abs(ref).max(), err


def test_unmasked_call_and_odd_pos_kernel_match():
  model = _tiny_hf(True, num_conv_pos_embeddings=7, hidden_act="gelu_new", feat_proj_layer_norm=False)
  wav, _ = _batch()
  import torch
  with torch.no_grad():
    ref = model(torch.from_numpy(wav)).last_hidden_state.numpy()
  cfg, params = convert.from_torch(model)
  hidden, frame_mask = jax.jit(Hubert(cfg).apply)({"params": params}, jnp.asarray(wav))
  assert bool(np.asarray(frame_mask).all())
  assert np.abs(np.asarray(hidden) - ref).max() <= 1e-4


def test_converted_tree_matches_init_tree():
  model = _tiny_hf(False)
  cfg, params = convert.from_torch(model)
  init = nn.unbox(jax.eval_shape(Hubert(cfg).init, jax.random.key(0), jnp.zeros((1, 4000)))["params"])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, init, params)) == [True] * len(
      jax.tree.leaves(params))


def test_weight_g_weight_v_spelling_and_prefix():
  model = _tiny_hf(True)
  cfg, params = convert.from_torch(model)
  sd = {}
  for k, v in model.state_dict().items():  # the older torch weight_norm names, as in hubert-large-ll60k
    k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                             "weight_v")
    sd["hubert." + k] = v
  old = convert.from_state_dict(sd, cfg)
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_normalize_waveform_matches_hf_feature_extractor():
  from transformers import Wav2Vec2FeatureExtractor

  wav, mask = _batch()
  fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
  ref = fe([w[:n] for w, n in zip(wav, LENGTHS)], sampling_rate=16000, padding=True, return_tensors="np")
  from star_jax.models.hubert import normalize_waveform
  ours = np.asarray(normalize_waveform(jnp.asarray(wav), jnp.asarray(mask))) * mask
  np.testing.assert_allclose(ours, ref["input_values"], atol=1e-5)


@pytest.mark.parametrize("c", [1, 200])  # narrow blocks take one im2col matmul, wide ones a matmul per block
@pytest.mark.parametrize("k,s", [(10, 5), (3, 2), (2, 2), (4, 3), (1, 1)])
def test_bf16_strided_conv_equals_lax_conv(k, s, c):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 37, c)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, c, 5)), jnp.bfloat16)
  ref = jax.lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (s,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
  out = jax.jit(strided_conv, static_argnums=(2, 3))(x, w, s, jnp.bfloat16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-3)


def _param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", ["large", "base"])
def test_paper_param_counts_equal_transformers(variant):
  torch = pytest.importorskip("torch")
  from transformers import HubertConfig as HFConfig, HubertModel

  if variant == "large":  # hubert-large-ll60k
    hf = HFConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, mask_time_prob=0.0)
  else:  # hubert-base-ls960
    hf = HFConfig(mask_time_prob=0.0)
  with torch.device("meta"):  # shapes only, nothing allocated
    ref = sum(p.numel() for p in HubertModel(hf).parameters())
  cfg = convert.config_from_hf(hf)
  shapes = jax.eval_shape(lambda: Hubert(cfg).init(jax.random.key(0), jnp.zeros((1, 16000))))["params"]
  # torch's weight norm keeps a gain per kernel tap (weight_g, k values) that conversion folds away
  assert _param_count(shapes) == ref - hf.num_conv_pos_embeddings
  if variant == "large":
    assert 3.14e8 < ref < 3.17e8


def test_config_section_builds_the_model():
  from star_jax.config import load_config

  for variant in ("tiny", "paper"):
    cfg = HubertConfig(**load_config(f"configs/star.py:{variant}").hubert.to_dict())
    assert cfg.hidden_size in (32, 1024)
  assert HubertConfig(**load_config("configs/star.py:paper").hubert.to_dict()).do_stable_layer_norm


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path):
  model = _tiny_hf(True)
  model.save_pretrained(tmp_path / "hf")
  from star_jax.checkpoint import load_params
  from star_jax.cli import main

  assert main(["convert", "hubert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
               "--dtype", "float32"]) == 0
  params, meta = load_params(str(tmp_path / "ckpt"))
  assert meta["kind"] == "hubert"
  cfg = HubertConfig(**meta["config"])
  wav, mask = _batch()
  hidden, frame_mask = jax.jit(Hubert(cfg).apply)({"params": params}, jnp.asarray(wav), jnp.asarray(mask))
  ref = _torch_hidden(model, wav, mask)
  assert np.abs(np.asarray(hidden) - ref)[np.asarray(frame_mask)].max() <= 1e-4
  assert main(["convert", "hubert", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_fresh_init_has_moderate_gradients_on_digital_silence():
  # TTS speech holds runs of exact zeros. With zero-initialised conv biases every conv LayerNorm then saw a
  # constant vector and the 1/sqrt(eps) backward compounded over the layers: stage 1's first gradient
  # norm was ~1e18. torch's bias init (which transformers keeps) leaves it O(1).
  cfg = HubertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48, conv_dim=(16,) * 7,
                     conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True,
                     feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=8,
                     num_conv_pos_embedding_groups=4)
  wav = 0.1 * np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32)
  wav[:, :4000] = 0.0  # leading digital silence
  model = Hubert(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), wav)["params"]
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, wav)[0] ** 2)))(params)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
  assert np.isfinite(norm) and norm < 1e3, norm


def test_min_input_length_pads_only_groupnorm_front_ends():
  group = HubertConfig(hidden_size=16, num_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 8),
                       conv_stride=(5, 4), feat_extract_norm="group", num_conv_pos_embedding_groups=4)
  assert min_input_length(group, 1005) == 1020 and min_input_length(group, 1000) == 1000  # whole 20-sample frames
  assert min_input_length(group, 0) == 0
  layer = HubertConfig(hidden_size=16, num_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 8),
                       conv_stride=(5, 4), feat_extract_norm="layer", num_conv_pos_embedding_groups=4)
  assert min_input_length(layer, 1005) == 0  # the frame mask makes padding exact: no need to pad
