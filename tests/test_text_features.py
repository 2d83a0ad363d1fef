"""FLAN-T5 caption features: `prepare audiocaps --text-encoder DIR` stores each caption's encoder states at its
valid tokens, and the tta stage trains on them (a tiny random T5 and a word-level tokenizer, nothing downloaded)."""

import numpy as np
import pytest

from star_jax.config import load_config
from tests.test_data_prep import _audiocaps_args, _prepare, _read_all, fake_audiocaps, needs_espeak  # noqa: F401

D_MODEL = 16


def _tiny_t5(directory, captions):
  """A random T5EncoderModel and a word-level fast tokenizer over the captions' words, saved like a hub model."""
  torch = pytest.importorskip("torch")
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

  words = sorted({w for c in captions for w in c.lower().split()})
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                          eos_token="</s>").save_pretrained(directory)
  torch.manual_seed(0)
  T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=D_MODEL, d_kv=8, num_heads=2, d_ff=32, num_layers=1,
                          decoder_start_token_id=0)).save_pretrained(directory)
  return str(directory)


@needs_espeak
def test_prepare_stores_t5_states_and_tta_trains_on_them(fake_audiocaps, tmp_path, mesh1):  # noqa: F811
  from star_jax.data.text import T5Features
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage
  from star_jax.train.writer import read_metrics

  captions = [f"a dog barks number {i}" for i in range(6)]
  t5_dir = _tiny_t5(tmp_path / "t5", captions)
  out = tmp_path / "data"
  assert _prepare(*_audiocaps_args(fake_audiocaps, out, "--tts", "espeak", "--text-encoder", t5_dir)) == 0
  recs = _read_all(out, "train")
  assert len(recs) == len(fake_audiocaps["good"])
  t5 = T5Features(t5_dir)
  for r in recs:
    want = t5([r["caption"]])[0]
    assert r["text_emb"].shape == (len(r["caption"].split()) + 1, D_MODEL)  # words + </s>: the mask's true rows
    np.testing.assert_allclose(r["text_emb"], want, atol=1e-6)
  # Padding in a batch does not change a caption's states (T5's encoder masks it).
  np.testing.assert_allclose(t5(["a dog", captions[0]])[0], t5(["a dog"])[0], atol=1e-5)

  cfg = load_config("configs/star.py:tiny", [
      f"data.path={out}", "data.audio_duration_s=0.32", "tta.text_dim=16", "tta.steps=3", "tta.batch_size=2",
      "train.log_every_steps=1", "dit.depth=2", "vae.channel_multiples=(1,2)", "vae.downsampling_ratios=(16,20)"])
  data = RecordData(cfg)
  res = loop.train(cfg, build_stage(cfg, "tta", data), str(tmp_path / "tta"), data, mesh=mesh1, progress=False)
  rows = read_metrics(str(tmp_path / "tta"))
  assert res.step == 3 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
