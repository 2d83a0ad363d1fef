"""`star-jax export` from released-checkpoint layouts, and generation equal to the PyTorch pipeline.

A tiny STAR is built in PyTorch from reference classes (transformers HubertModel; a Blip2QFormerModel saved under
STAR's QformerBridgeNet names; bench/torch_udit.py's MaskDiT saved as an EzAudio checkpoint with its buffers and
yml; diffusers AutoencoderOobleck), run end to end in PyTorch, exported, and generated with star-jax from the
same noise. Every other layout `export` accepts is checked to give the same bundle.
"""

import json

import jax
import numpy as np
import pytest
import soundfile as sf

from star_jax.checkpoint import load_params
from star_jax.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

SPEECH_HZ = 16000
STEPS, CFG_SCALE, SWAY, LATENT_SCALE = 4, 3.0, -1.0, 0.5
DIT = dict(latent_channels=8, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2, context_dim=24, lora_rank=4,
           lora_alpha=8.0)
VAE = dict(encoder_hidden_size=16, decoder_channels=8, decoder_input_channels=8, audio_channels=1,
           downsampling_ratios=[2, 4], channel_multiples=[1, 2], sampling_rate=16000)


def _ezaudio_yml(path, **changes):
  """EzAudio's ckpts/ezaudio-*.yml layout for the tiny UDiT."""
  import yaml
  model = dict(mae=True, patch_size=1, in_chans=2 * DIT["latent_channels"] + 1, out_chans=DIT["latent_channels"],
               input_type="1d", embed_dim=DIT["hidden_size"], depth=DIT["depth"], num_heads=DIT["num_heads"],
               mlp_ratio=float(DIT["mlp_ratio"]), qkv_bias=False, qk_norm="layernorm", act_layer="geglu",
               context_norm=True, time_fusion="ada_sola_bias", ada_sola_rank=DIT["lora_rank"],
               ada_sola_alpha=int(DIT["lora_alpha"]), cls_dim=None, context_dim=DIT["context_dim"],
               context_fusion="cross", context_pe_method="none", pe_method="none", rope_mode="shared",
               use_conv=True, skip=True, skip_norm=True)
  model.update(changes)
  doc = dict(model_name="EzAudio-tiny", model=model,
             autoencoder=dict(name="stable_vae", dim=DIT["latent_channels"], sr=VAE["sampling_rate"],
                              scale=LATENT_SCALE, shift=0.0))
  with open(path, "w") as f:
    yaml.safe_dump(doc, f)
  return str(path)


def _perturb(model, scale):
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def star(tmp_path_factory):
  """The tiny PyTorch STAR, its files in released layouts, and the PyTorch pipeline's audio for one query."""
  from bench.torch_udit import MaskDiT
  from tests.test_bridge import _lavis_names, _tiny_hf as tiny_qformer
  from tests.test_hubert import _tiny_hf as tiny_hubert
  from tests.test_vae import _random_oobleck

  root = tmp_path_factory.mktemp("star")
  hubert = tiny_hubert(True, conv_dim=(16, 16), conv_kernel=(10, 64), conv_stride=(5, 64), num_hidden_layers=1)
  hubert.save_pretrained(root / "hubert")
  qformer, queries, projection = tiny_qformer(hidden_size=128, num_attention_heads=2, intermediate_size=64,
                                              num_hidden_layers=2, encoder_hidden_size=32)
  projection = torch.nn.Linear(128, DIT["context_dim"])
  stage1 = _lavis_names(qformer, queries, projection)
  stage1["audio_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # a buffer STAR's file keeps
  torch.save(stage1, root / "star_stage1.pt")
  torch.manual_seed(1)
  dit = _perturb(MaskDiT(**DIT).eval(), 0.1)
  torch.save({"model": dit.state_dict()}, root / "ezaudio.pt")
  vae = _random_oobleck(VAE, seed=2)
  vae.save_pretrained(root / "vae")

  speech = (0.3 * np.random.default_rng(0).standard_normal(SPEECH_HZ)).astype(np.float32)  # exactly 1 s: no padding
  sf.write(root / "query.wav", speech, SPEECH_HZ, subtype="FLOAT")
  noise = np.random.default_rng(1).standard_normal((25, DIT["latent_channels"])).astype(np.float32)
  np.save(root / "noise.npy", noise)
  with torch.no_grad():
    feats = hubert(torch.from_numpy(speech)[None]).last_hidden_state
    tokens = projection(qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state)
    u = torch.linspace(0, 1, STEPS + 1)
    sigmas = 1 - (u + SWAY * (torch.cos(torch.pi / 2 * u) - 1 + u))
    x = torch.from_numpy(noise)[None]
    context = torch.cat([tokens, torch.zeros_like(tokens)])
    for i in range(STEPS):
      v = dit(torch.cat([x, x]), torch.full((2,), 1000 * float(sigmas[i])), context)
      x = x + (sigmas[i + 1] - sigmas[i]) * (v[1:] + CFG_SCALE * (v[:1] - v[1:]))
    audio = vae.decode((x / LATENT_SCALE).transpose(1, 2)).sample[0, 0].numpy()  # EzAudio: z = x / scale - shift
  return dict(root=root, audio=audio, hubert=hubert, qformer=qformer, queries=queries, projection=projection,
              dit=dit, vae=vae)


def _export(star, out, expect_exit=0, **paths):
  """`star-jax export` of the tiny STAR's files, with `paths` replacing some -> the bundle's (params, meta)."""
  r = star["root"]
  given = dict(hubert=r / "hubert", bridge=r / "star_stage1.pt", dit=r / "ezaudio.pt",
               dit_config=_ezaudio_yml(r / "ezaudio-tiny.yml"), vae=r / "vae")
  given.update(paths)
  argv = ["export", "--out", str(out), "--dtype", "float32"]
  for k, v in given.items():
    if v is not None:
      argv += [f"--{k.replace('_', '-')}", str(v)]
  assert main(argv) == expect_exit
  return load_params(str(out)) if expect_exit == 0 else None


def test_released_layouts_generate_what_the_pytorch_pipeline_generates(star, tmp_path):
  """HuBERT dir + STAR stage-1 .pt + EzAudio .pt/.yml + diffusers VAE -> bundle -> generate --init-noise --float
  writes the PyTorch pipeline's audio (Euler on the sway grid, CFG against a zero condition, latent scale)."""
  params, meta = _export(star, tmp_path / "bundle")
  cfg = meta["config"]
  assert cfg["dit"]["lora_alpha"] == DIT["lora_alpha"] and cfg["flow"]["latent_scale"] == LATENT_SCALE
  assert cfg["qformer"]["num_heads"] == 2 and cfg["vae"]["sample_rate_hz"] == VAE["sampling_rate"]
  out = tmp_path / "sound.wav"
  assert main(["generate", "--ckpt", str(tmp_path / "bundle"), "--speech", str(star["root"] / "query.wav"),
               "--out", str(out), "--init-noise", str(star["root"] / "noise.npy"), "--float", "--steps", str(STEPS),
               "--cfg", str(CFG_SCALE), "--sway", str(SWAY)]) == 0
  wav, rate = sf.read(str(out), dtype="float32")
  ref = star["audio"]
  assert rate == VAE["sampling_rate"] and wav.shape == ref.shape == (25 * 8,)
  assert sf.info(str(out)).subtype == "FLOAT"
  from star_jax import trained
  parts, kind = trained.load_trained(str(tmp_path / "bundle"))  # what stage 2's init_dit/init_bridge/init_vae read
  assert kind == "bundle" and sorted(parts) == ["bridge", "dit", "hubert", "vae"]
  _assert_same(parts["dit"], params["dit"])
  peak = np.abs(ref).max()
  assert peak > 1e-3
  assert np.abs(wav - ref).max() <= 1e-4 * peak, np.abs(wav - ref).max() / peak


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_blip2_qformer_dir_with_its_queries_equals_the_star_checkpoint(star, tmp_path):
  want, _ = _export(star, tmp_path / "a")
  star["qformer"].save_pretrained(tmp_path / "blip2")
  p = star["projection"]
  torch.save({"query_tokens": star["queries"], "projection.weight": p.weight, "projection.bias": p.bias},
             tmp_path / "extra.pt")
  got, meta = _export(star, tmp_path / "b", bridge=tmp_path / "blip2", bridge_extra=tmp_path / "extra.pt")
  _assert_same(got["bridge"], want["bridge"])
  assert meta["config"]["qformer"]["num_heads"] == 2  # read from the directory's config.json


def test_star_stage2_checkpoint_gives_the_backbone_and_its_trained_projection(star, tmp_path):
  want, _ = _export(star, tmp_path / "a")
  sd = {"backbone." + k: v for k, v in star["dit"].state_dict().items()}
  trained = torch.randn(DIT["context_dim"], 128)
  sd.update({"speech_encoder.hiddin_projection.weight": trained,
             "speech_encoder.hiddin_projection.bias": torch.zeros(DIT["context_dim"])})
  torch.save(sd, tmp_path / "star_stage2.pt")
  got, _ = _export(star, tmp_path / "b", dit=tmp_path / "star_stage2.pt")
  _assert_same(got["dit"], want["dit"])
  np.testing.assert_array_equal(got["bridge"]["projection"]["kernel"], trained.numpy().T)


@pytest.mark.parametrize("wrap", ["state_dict", "none"])
def test_stable_audio_checkpoint_with_its_config_equals_the_diffusers_dir(star, tmp_path, wrap, capsys):
  from tests.test_vae import _to_stable_audio_names

  want, _ = _export(star, tmp_path / "a")
  sd = _to_stable_audio_names(star["vae"].state_dict(), len(VAE["downsampling_ratios"]))  # `autoencoder.` names
  torch.save({"state_dict": sd} if wrap == "state_dict" else sd, tmp_path / "1m.pt")
  config = {"model_type": "autoencoder", "sample_rate": VAE["sampling_rate"], "audio_channels": 1, "model": {
      "encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 16, "c_mults": [1, 2],
                                                "strides": [2, 4], "latent_dim": 16, "use_snake": True}},
      "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 8, "c_mults": [1, 2],
                                                "strides": [2, 4], "latent_dim": 8, "use_snake": True,
                                                "final_tanh": False}},
      "bottleneck": {"type": "vae"}, "latent_dim": 8, "downsampling_ratio": 8, "io_channels": 1}}
  (tmp_path / "config.json").write_text(json.dumps(config))
  got, meta = _export(star, tmp_path / "b", vae=tmp_path / "1m.pt", vae_config=tmp_path / "config.json")
  _assert_same(got["vae"], want["vae"])
  config["model"]["encoder"]["config"]["strides"] = config["model"]["decoder"]["config"]["strides"] = [4, 2]
  (tmp_path / "config.json").write_text(json.dumps(config))
  _export(star, tmp_path / "c", 2, vae=tmp_path / "1m.pt", vae_config=tmp_path / "config.json")
  assert "downsampling_ratios (2, 4) in the weights, (4, 2) in the config" in capsys.readouterr().err


def test_star_jax_checkpoints_and_mismatches(star, tmp_path, capsys):
  """A `star-jax convert` checkpoint stands in for any component; a yml describing another UDiT, a rotary mode
  star-jax does not build, or components that do not connect are errors naming the problem."""
  want, _ = _export(star, tmp_path / "a")
  assert main(["convert", "vae", "--from", str(star["root"] / "vae"), "--out", str(tmp_path / "vae_ckpt")]) == 0
  got, _ = _export(star, tmp_path / "b", vae=tmp_path / "vae_ckpt")
  _assert_same(got["vae"], want["vae"])
  capsys.readouterr()
  for changes, message in ((dict(embed_dim=64), "embed_dim 32 in the weights, 64 in the yml"),
                           (dict(rope_mode="none"), "rope_mode: 'none' is not the UDiT star-jax builds")):
    _export(star, tmp_path / "c", 2, dit_config=_ezaudio_yml(tmp_path / "x.yml", **changes))
    assert message in capsys.readouterr().err
  _export(star, tmp_path / "d", 2, vae=None)
  assert "missing ['vae']: pass --vae PATH" in capsys.readouterr().err
  _export(star, tmp_path / "e", 2, dit=star["root"] / "star_stage1.pt")
  assert "'*time_ada_final.weight'" in capsys.readouterr().err
