"""CNN14 and VGGish ports against panns_inference and torchvggish on random weights; CLAP score
against a tiny random transformers ClapModel."""

import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from conftest import torch_or_skip


def _panns_models():
  """panns_inference.models without running the package __init__, which downloads a labels CSV."""
  pytest.importorskip("torchlibrosa")
  spec = importlib.util.find_spec("panns_inference")
  if spec is None:
    pytest.skip("panns_inference is not installed")
  if "panns_inference" not in sys.modules:
    pkg = types.ModuleType("panns_inference")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["panns_inference"] = pkg
  return importlib.import_module("panns_inference.models")


def _randomize_batchnorm(model, torch, seed=1):
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
      m.bias.data = 0.2 * torch.randn(n, generator=g)
      m.running_mean.data = 0.2 * torch.randn(n, generator=g)
      m.running_var.data = 0.5 + torch.rand(n, generator=g)


def test_cnn14_matches_panns_inference():
  torch = torch_or_skip()
  models = _panns_models()
  from star_jax.convert.cnn14 import convert_state_dict
  from star_jax.metrics.cnn14 import Cnn14Embedder, logmel

  torch.manual_seed(0)
  ref = models.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                     classes_num=527).eval()
  _randomize_batchnorm(ref, torch)
  config, params = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
  assert (config.sample_rate_hz, config.window_size, config.hop_size, config.fmax_hz) == (16000, 512, 160, 8000)
  wav = (np.random.RandomState(0).randn(2, 8000) * 0.1).astype(np.float32)  # 0.5 s: 51 frames, 1 after 5 pools

  with torch.no_grad():
    x = torch.from_numpy(wav)
    ref_logmel = ref.logmel_extractor(ref.spectrogram_extractor(x))[:, 0].numpy()
    out = ref(x)
    ref_logits = ref.fc_audioset(out["embedding"]).numpy()
  np.testing.assert_allclose(np.asarray(logmel(wav, config)), ref_logmel, atol=1e-4, rtol=0)

  model = Cnn14Embedder(params, config)
  emb, logits = model._apply(model.params, wav)
  assert np.abs(np.asarray(emb) - out["embedding"].numpy()).max() <= 1e-4
  assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4
  probs = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  assert np.abs(probs - out["clipwise_output"].numpy()).max() <= 1e-4
  assert np.abs(out["embedding"].numpy()).max() > 0.05  # the comparison is not between near-zeros


def test_vggish_matches_torchvggish():
  torch = torch_or_skip()
  pytest.importorskip("torchvggish")
  from torchvggish import vggish_input
  from torchvggish.torchvggish import VGG, make_layers

  from star_jax.convert.vggish import convert_state_dict
  from star_jax.metrics.vggish import VggishConfig, VggishEmbedder, examples

  torch.manual_seed(0)
  ref = VGG(make_layers(), postprocess=False).eval()
  with torch.no_grad():
    for p in ref.embeddings.parameters():
      p.mul_(8.0)  # default init gives ~0.02 outputs; make the comparison meaningful
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  config, params = convert_state_dict(sd)
  assert config.layers == VggishConfig().layers and config.fc_sizes == (4096, 4096, 128)
  wav = (np.random.RandomState(0).randn(int(16000 * 2.3)) * 0.3).astype(np.float32)

  ref_examples = vggish_input.waveform_to_examples(wav.astype(np.float64), 16000).detach()
  np.testing.assert_allclose(np.asarray(examples(wav, config)), ref_examples[:, 0].numpy(), atol=1e-4, rtol=0)
  with torch.no_grad():
    feats = ref.features(ref_examples)
    flat = feats.permute(0, 2, 3, 1).reshape(feats.shape[0], -1)
    ref_pre_relu = torch.nn.Sequential(*list(ref.embeddings.children())[:-1])(flat).numpy()  # audioldm_eval's FAD
    ref_full = ref(ref_examples).numpy()

  emb, logits = VggishEmbedder(params, config).embed(wav)
  assert logits is None and emb.shape == (2, 128)
  assert np.abs(emb - ref_pre_relu).max() <= 1e-4
  assert np.abs(ref_pre_relu).max() > 0.1
  relu_cfg, relu_params = convert_state_dict(sd, final_relu=True)
  assert np.abs(VggishEmbedder(relu_params, relu_cfg).embed(wav)[0] - ref_full).max() <= 1e-4
  assert VggishEmbedder(params, config).embed(wav[:15000])[0].shape == (0, 128)  # < one 0.96 s example


def _tiny_clap_dir(path):
  """A tiny random ClapModel + ClapProcessor (character-level RoBERTa BPE vocab) saved to `path`."""
  torch = torch_or_skip()
  from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

  os.makedirs(path, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *letters,
                                       *("\u0120" + c for c in letters)])}
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tokenizer = RobertaTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
  features = ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=80, max_length_s=1,
                                  fft_window_size=256, frequency_max=4000, truncation="rand_trunc")
  config = ClapConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64, projection_dim=8),
      audio_config=dict(spec_size=64, num_mel_bins=16, window_size=4, patch_size=2, patch_stride=(2, 2),
                        depths=(1, 1), num_attention_heads=(2, 2), patch_embeds_hidden_size=8, hidden_size=16,
                        projection_dim=8),
      projection_dim=8)
  torch.manual_seed(0)
  model = ClapModel(config).eval()
  model.save_pretrained(path)
  ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(path)
  return model, ClapProcessor(feature_extractor=features, tokenizer=tokenizer)


def test_clap_score_matches_tiny_clap_model(tmp_path):
  torch = torch_or_skip()
  from star_jax.metrics.clap import ClapScorer

  model, processor = _tiny_clap_dir(str(tmp_path / "clap"))
  captions = ["a dog barks", "rain on a roof", "wind"]
  wavs = [(np.random.RandomState(i).randn(6000 + 500 * i) * 0.2).astype(np.float32) for i in range(3)]
  scorer = ClapScorer(str(tmp_path / "clap"), batch_size=2)
  assert scorer.sample_rate_hz == 8000
  ours = scorer.score(captions, wavs)
  inputs = processor(text=captions, audio=wavs, sampling_rate=8000, return_tensors="pt", padding=True)
  with torch.no_grad():
    out = model(**inputs)
  want = (torch.diagonal(out.logits_per_text) / model.logit_scale_t.exp()).detach().numpy()
  np.testing.assert_allclose(ours, want, atol=1e-5)
