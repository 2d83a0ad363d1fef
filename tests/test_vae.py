"""Oobleck VAE: parity with diffusers.AutoencoderOobleck, stable-audio-tools names, lengths, grads, sharding."""

import argparse
import dataclasses
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from star_jax import sharding
from star_jax.models import vae as vae_module
from star_jax.models.vae import (OobleckVAE, VAEConfig, decoded_length, hop_length, latent_length,
                                 posterior_kl, residual_tile, sample_posterior)

# (diffusers AutoencoderOobleck kwargs, number of input samples): non-default ratios, odd lengths,
# stereo, a posterior narrower than the decoder input, an odd stride and a stride of 1.
CONFIGS = [
    (dict(encoder_hidden_size=8, decoder_channels=8, decoder_input_channels=4, audio_channels=1,
          downsampling_ratios=[2, 4, 5, 8], channel_multiples=[1, 2, 4, 8], sampling_rate=16000), 3 * 320 + 77),
    (dict(encoder_hidden_size=6, decoder_channels=10, decoder_input_channels=5, audio_channels=2,
          downsampling_ratios=[3, 2], channel_multiples=[2, 3], sampling_rate=24000), 6 * 7 + 5),
    (dict(encoder_hidden_size=4, decoder_channels=4, decoder_input_channels=2, audio_channels=1,
          downsampling_ratios=[1, 4, 6], channel_multiples=[1, 1, 2], sampling_rate=24000), 24 * 3),
]


def _random_oobleck(kwargs, seed=0):
  """A diffusers AutoencoderOobleck with every weight random, snakes and weight-norm gains included."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.AutoencoderOobleck(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("alpha", "beta")):
        p.normal_(0.0, 0.5)
      elif name.endswith("weight_g"):
        p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
  return model


def _btc(t):
  return np.asarray(t.detach().numpy()).transpose(0, 2, 1)


# time_tile 4: the residual units one time tile at a time (the CPU default at paper sizes; rounded up to each
# decoder block's stride), so that every tile boundary, sequence end and odd stride meets the reference.
@pytest.mark.parametrize("time_tile", [None, 4])
@pytest.mark.parametrize("kwargs,num_samples", CONFIGS)
def test_parity_with_diffusers(kwargs, num_samples, time_tile):
  torch = pytest.importorskip("torch")
  from star_jax.convert.vae import from_torch

  model = _random_oobleck(kwargs)
  cfg, params = from_torch(model)
  vae = OobleckVAE(cfg, time_tile=time_tile)
  channels = kwargs["audio_channels"]
  wav = torch.randn(2, channels, num_samples)
  latents = torch.randn(2, kwargs["decoder_input_channels"], 7)
  with torch.no_grad():
    posterior = model.encode(wav).latent_dist
    ref_wav = model.decode(latents).sample
  wav_ours = wav.numpy().transpose(0, 2, 1)
  mean, std = jax.jit(partial(vae.apply, method="encode"))({"params": params},
                                                           wav_ours[..., 0] if channels == 1 else wav_ours)
  out = jax.jit(partial(vae.apply, method="decode"))({"params": params}, jnp.asarray(_btc(latents)))
  out = out[..., None] if channels == 1 else out

  assert mean.shape[1] == latent_length(cfg, num_samples) == posterior.mean.shape[-1]
  assert out.shape[1] == decoded_length(cfg, 7) == ref_wav.shape[-1]
  np.testing.assert_allclose(mean, _btc(posterior.mean), atol=1e-4, rtol=0)
  np.testing.assert_allclose(std, _btc(posterior.std), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out, _btc(ref_wav), atol=1e-4, rtol=0)
  ref_kl = posterior.kl().item()
  np.testing.assert_allclose(posterior_kl(mean, std), ref_kl, rtol=1e-4)


def _to_stable_audio_names(state_dict, n):
  """diffusers names -> stable-audio-tools names (nn.Sequential indices of OobleckEncoder/Decoder), with
  the `autoencoder.` prefix EzAudio checkpoints carry. Written independently of the converter's table."""
  unit = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}
  rules = [
      (r"encoder\.conv1\.", "encoder.layers.0."),
      (r"encoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.",
       lambda m: f"encoder.layers.{int(m[1]) + 1}.layers.{int(m[2]) - 1}.layers.{unit[m[3]]}."),
      (r"encoder\.block\.(\d+)\.snake1\.", lambda m: f"encoder.layers.{int(m[1]) + 1}.layers.3."),
      (r"encoder\.block\.(\d+)\.conv1\.", lambda m: f"encoder.layers.{int(m[1]) + 1}.layers.4."),
      (r"encoder\.snake1\.", f"encoder.layers.{n + 1}."),
      (r"encoder\.conv2\.", f"encoder.layers.{n + 2}."),
      (r"decoder\.conv1\.", "decoder.layers.0."),
      (r"decoder\.block\.(\d+)\.snake1\.", lambda m: f"decoder.layers.{int(m[1]) + 1}.layers.0."),
      (r"decoder\.block\.(\d+)\.conv_t1\.", lambda m: f"decoder.layers.{int(m[1]) + 1}.layers.1."),
      (r"decoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.",
       lambda m: f"decoder.layers.{int(m[1]) + 1}.layers.{int(m[2]) + 1}.layers.{unit[m[3]]}."),
      (r"decoder\.snake1\.", f"decoder.layers.{n + 1}."),
      (r"decoder\.conv2\.", f"decoder.layers.{n + 2}."),
  ]
  out = {}
  for name, value in state_dict.items():
    new = name
    for pattern, repl in rules:
      new, hits = re.subn("^" + pattern, repl, name)
      if hits:
        break
    assert hits, name
    if new.endswith((".alpha", ".beta")):
      value = value.reshape(-1)  # stable-audio SnakeBeta params are (C,), diffusers' (1, C, 1)
    out["autoencoder." + new] = value
  return out


@pytest.mark.parametrize("spelling", ["weight_g", "parametrizations"])
def test_stable_audio_names_match_diffusers(spelling):
  torch = pytest.importorskip("torch")
  from star_jax.convert.vae import from_stable_audio_state_dict, from_torch

  kwargs, num_samples = CONFIGS[1]
  model = _random_oobleck(kwargs, seed=1)
  cfg, params = from_torch(model)
  sd = _to_stable_audio_names(model.state_dict(), len(kwargs["downsampling_ratios"]))
  if spelling == "parametrizations":
    sd = {k.replace(".weight_g", ".parametrizations.weight.original0")
           .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in sd.items()}
  sa_cfg, sa_params = from_stable_audio_state_dict(sd, sample_rate_hz=kwargs["sampling_rate"])
  assert sa_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sa_params, params)
  latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, cfg.latent_channels)), jnp.float32)
  with torch.no_grad():
    ref = model.decode(torch.from_numpy(np.asarray(latents).transpose(0, 2, 1))).sample
  decode = jax.jit(partial(OobleckVAE(sa_cfg).apply, method="decode"))
  np.testing.assert_allclose(decode({"params": sa_params}, latents),
                             _btc(ref), atol=1e-4, rtol=0)


def test_converter_rejects_unknown_layouts():
  pytest.importorskip("torch")
  from star_jax.convert.vae import from_stable_audio_state_dict
  from star_jax.errors import UserError

  model = _random_oobleck(CONFIGS[2][0])
  sd = _to_stable_audio_names(model.state_dict(), 3)
  with pytest.raises(UserError, match="does not use"):  # e.g. an anti-aliased activation's filter
    from_stable_audio_state_dict({**sd, "autoencoder.decoder.layers.4.act.upsample.filter": np.zeros(3)})
  with pytest.raises(UserError, match="missing"):
    from_stable_audio_state_dict({k: v for k, v in sd.items() if "layers.2.layers.1" not in k})


def test_convert_cli_diffusers_dir_and_file(tmp_path):
  pytest.importorskip("torch")
  from safetensors.numpy import save_file

  from star_jax.checkpoint import load_params
  from star_jax.convert import cli as convert_cli
  from star_jax.convert.vae import from_torch

  model = _random_oobleck(CONFIGS[2][0])
  cfg, params = from_torch(model)
  model.save_pretrained(tmp_path / "pipe" / "vae")
  sd = {k: v.numpy() for k, v in _to_stable_audio_names(model.state_dict(), 3).items()}
  save_file(sd, str(tmp_path / "vae.safetensors"))
  for source, extra in [(tmp_path / "pipe", []), (tmp_path / "vae.safetensors", ["--sample-rate", "24000"])]:
    out = tmp_path / ("out_" + source.name)
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    assert convert_cli.run(parser.parse_args(["vae", "--from", str(source), "--out", str(out), *extra])) == 0
    loaded, meta = load_params(str(out))
    assert VAEConfig(**meta["config"]) == cfg
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loaded, params)


TINY = VAEConfig(sample_rate_hz=16000, encoder_hidden_size=4, decoder_channels=4, channel_multiples=(1, 2),
                 downsampling_ratios=(2, 5), latent_channels=3)


@pytest.fixture(scope="module")
def tiny_params():
  """Random params for TINY from numpy (no init to compile): kernels ~ N(0, 1/fan_in), snakes and biases too."""
  shapes = nn.unbox(jax.eval_shape(OobleckVAE(TINY).init, jax.random.key(0), jnp.zeros((1, 40)))["params"])
  rng = np.random.default_rng(0)
  scale = lambda shape: np.prod(shape[:-1]) ** -0.5 if len(shape) == 3 else 0.3
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale(s.shape), s.shape), jnp.float32), shapes)


def test_lengths_and_config_sections():
  from star_jax.config import load_config
  from star_jax.models import build

  for variant, rate in [("tiny", 16000), ("paper", 24000)]:  # tiny's Oobleck sizes (its default codec is mel)
    cfg = build.vae_config(load_config(f"configs/star.py:{variant}", ["vae.kind=oobleck"]))
    assert cfg.sample_rate_hz == rate and cfg.sample_rate_hz // hop_length(cfg) == 50  # DESIGN.md §2
    assert latent_length(cfg, 10 * rate) == 500
  paper = VAEConfig()
  assert decoded_length(paper, 500) == 240000  # all strides even: exact inverse
  assert decoded_length(TINY, 4) == 38  # odd stride 5: one sample short at that level, doubled by stride 2


def test_logical_axes_and_shapes():
  abstract = jax.eval_shape(lambda r: OobleckVAE(TINY).init(r, jnp.zeros((1, 40)))["params"],
                            jax.random.key(0))
  specs = nn.get_partition_spec(abstract)
  assert specs["encoder"]["block_0"]["res_0"]["conv1"]["kernel"] == P(None, "conv_in", "conv_out")
  assert specs["decoder"]["block_0"]["conv_t"]["kernel"] == P(None, "conv_in", "conv_out")
  assert specs["decoder"]["block_1"]["res_2"]["snake2"]["alpha"] == P("conv_out")
  assert specs["encoder"]["conv_out"]["bias"] == P("conv_out")
  params = nn.unbox(abstract)
  assert params["decoder"]["block_0"]["conv_t"]["kernel"].shape == (10, 8, 4)  # (2s, C_in, C_out)
  assert "bias" not in params["decoder"]["conv_out"]


def test_gradients_finite_and_sampling(tiny_params):
  params = tiny_params
  wav = jax.random.normal(jax.random.key(1), (2, 50))

  def loss(p):
    out, mean, std = OobleckVAE(TINY).apply({"params": p}, wav, jax.random.key(2))
    return jnp.mean(jnp.square(out - wav[:, :out.shape[1]])) + posterior_kl(mean, std)

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  mean, std = jnp.zeros((2, 3, 4)), jnp.full((2, 3, 4), 2.0)
  z = sample_posterior(jax.random.key(3), mean, std)
  np.testing.assert_allclose(z, 2.0 * jax.random.normal(jax.random.key(3), (2, 3, 4)))


def test_bf16_compute_close_to_f32(tiny_params):
  params = tiny_params
  latents = jax.random.normal(jax.random.key(1), (2, 6, 3))
  decode = lambda cfg: jax.jit(partial(OobleckVAE(cfg).apply, method="decode"))
  f32 = decode(TINY)({"params": params}, latents)
  bf16 = decode(dataclasses.replace(TINY, dtype="bfloat16"))({"params": params}, latents)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - f32).max()) <= 3e-2 * float(jnp.abs(f32).max())


def test_time_tiles_equal_untiled_with_gradients():
  """The decoder's time-tiled residual units (CPU, bf16) against untiled, in f32: waveform and every gradient
  (the encoder's tiles are held to diffusers above). Kernels at init's scale, random biases and snakes
  (`tiny_params`' larger kernels amplify f32 rounding: jit and eager of one untiled program differ by 1e-4)."""
  latents = jax.random.normal(jax.random.key(1), (2, 33, TINY.latent_channels))
  target = jax.random.normal(jax.random.key(2), (2, decoded_length(TINY, 33)))
  shapes = nn.unbox(jax.eval_shape(OobleckVAE(TINY).init, jax.random.key(0), target[:, :80])["params"])
  rng = np.random.default_rng(0)
  scale = lambda shape: (3 * np.prod(shape[:-1])) ** -0.5 if len(shape) == 3 else 0.1
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, scale(a.shape), a.shape), jnp.float32), shapes)

  def loss(p, time_tile):
    out = OobleckVAE(TINY, time_tile=time_tile).apply({"params": p}, latents, method="decode")
    return jnp.mean(jnp.square(out - target)), out

  (want, want_out), want_grads = jax.jit(jax.value_and_grad(partial(loss, time_tile=0), has_aux=True))(params)
  (got, got_out), got_grads = jax.jit(jax.value_and_grad(partial(loss, time_tile=7), has_aux=True))(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)
  close(got_out, want_out)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(close, got_grads["decoder"], want_grads["decoder"])


def test_time_tile_sizes(monkeypatch):
  """Paper decode of 10 s on a CPU with bf16 dot instructions, in bf16: tiles of 1025-2048 frames that divide
  each level's length and are multiples of its stride; f32, activations under 8 MB and CPUs without those
  instructions stay untiled; a requested tile is rounded up to the stride, 0 is untiled."""
  monkeypatch.setattr(vae_module, "cpu_has_bf16_dot", lambda: True)
  levels = [(5000, 512, 10), (30000, 256, 6), (120000, 128, 4), (240000, 128, 2)]  # frames, channels, stride
  tiles = [residual_tile(None, n, c, s) for n, c, s in levels]
  assert tiles == [1250, 1500, 2000, 2000]
  assert all(n % t == 0 and t % s == 0 for t, (n, _, s) in zip(tiles, levels))
  assert residual_tile(None, 30001, 256, 6) == 2046  # no divisor: a multiple of the stride, the last tile padded
  assert residual_tile(None, 8000, 16, 2) == 0  # tiny's 0.5-s crops: 0.5 MB
  assert residual_tile(None, 240000, 128, 2, jnp.float32) == 0  # f32: XLA's convolution is as fast
  assert residual_tile(None, 240000, 128, 2, jnp.float16) == 0  # measured for bf16 only
  assert residual_tile(7, 1000, 4, 4) == 8 and residual_tile(0, 100000, 128, 4) == 0
  monkeypatch.setattr(vae_module, "cpu_has_bf16_dot", lambda: False)  # bf16 matmuls below the f32 rate
  assert residual_tile(None, 240000, 128, 2) == 0 and residual_tile(7, 1000, 4, 4) == 8


def test_cpu_has_bf16_dot(tmp_path):
  """The CPU flags that turn the time tiles on: x86 AVX512-BF16 or AMX-BF16, Arm BF16; none, or no cpuinfo: off."""
  cases = {"flags\t\t: fpu sse2 avx2 fma f16c": False, "flags\t\t: fpu avx2 avx512f avx512_bf16 vaes": True,
           "flags\t\t: fpu avx2 amx_bf16 amx_tile": True, "Features\t: fp asimd sve i8mm bf16": True}
  for i, (line, has) in enumerate(cases.items()):
    (tmp_path / f"cpuinfo{i}").write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert vae_module.cpu_has_bf16_dot(str(tmp_path / f"cpuinfo{i}")) is has, line
  assert vae_module.cpu_has_bf16_dot(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("time_tile", [None, 8])
def test_sharded_equals_unsharded(mesh222, rules, time_tile):
  cfg = dataclasses.replace(TINY, encoder_hidden_size=8, decoder_channels=8, latent_channels=4)
  params, shardings = sharding.init_sharded(lambda r: OobleckVAE(cfg).init(r, jnp.zeros((1, 40)))["params"],
                                            mesh222, rules, jax.random.key(0))
  assert shardings["encoder"]["block_0"]["res_0"]["conv1"]["kernel"].spec == P(None, "fsdp", "tensor")
  wav = jax.random.normal(jax.random.key(1), (4, 70))
  vae = OobleckVAE(cfg, time_tile=time_tile)

  def run(p, w):
    mean, std = vae.apply({"params": p}, w, method="encode")
    return mean, std, vae.apply({"params": p}, mean, method="decode")

  ref = jax.jit(run)(jax.device_get(params), wav)
  with jax.set_mesh(mesh222), nn.logical_axis_rules(rules):
    out = jax.jit(run)(params, jax.device_put(wav, sharding.batch_sharding(mesh222)))
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
