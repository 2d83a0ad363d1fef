"""A tiny random transformers VitsModel saved to a directory, as `--tts-model` / `data.synth.vits_models` read."""

import json

import pytest


# VitsConfig fields of the tiny model (bench/tts_throughput.py times this size too).
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, flow_size=16, spectrogram_bins=8,
            duration_predictor_num_flows=2, duration_predictor_filter_channels=16, prior_encoder_num_flows=2,
            posterior_encoder_num_wavenet_layers=2, prior_encoder_num_wavenet_layers=2, upsample_initial_channel=16,
            upsample_rates=[8, 2], upsample_kernel_sizes=[16, 4], resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], sampling_rate=22050)


def save_tiny_vits(model_dir, num_speakers=1):
  torch = pytest.importorskip("torch")
  from transformers import VitsConfig, VitsModel, VitsTokenizer

  chars = list("abcdefghijklmnopqrstuvwxyz '")
  vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
  model_dir.mkdir()
  (model_dir / "vocab.json").write_text(json.dumps(vocab))
  tokenizer = VitsTokenizer(str(model_dir / "vocab.json"), phonemize=False, add_blank=True, normalize=True)
  config = VitsConfig(vocab_size=len(vocab), **TINY, num_speakers=num_speakers,
                      speaker_embedding_size=8 if num_speakers > 1 else 0)
  torch.manual_seed(0)
  VitsModel(config).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
