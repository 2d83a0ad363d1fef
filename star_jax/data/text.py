"""Caption features for the `tta` stage's text condition, stored per record as `text_emb` (tokens, text_dim).

- `T5Features`: FLAN-T5's encoder, as STAR's text-to-audio initialisation (EzAudio: `google/flan-t5-large`, the
  last hidden state of up to 100 tokens): a caption's states at its valid tokens, so the stored rows are the
  attention mask's true positions and the pipeline's `text_mask` recovers the mask.
- `hash_embed`: the offline fallback needing no model, a hashed bag of words: word w maps to N(0, 1/dim) drawn
  from a generator seeded by crc32(w), the same on every machine and run; its only structure is word identity
  (no order, no synonyms).
"""

from __future__ import annotations

import json
import os
import re
import zlib

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def hash_embed(text: str, dim: int, *, max_words: int | None = None) -> np.ndarray:
  """Caption -> (num_words, dim) float32, one row per word (at least one row: an empty text gives zeros)."""
  tokens = words(text)[:max_words]
  if not tokens:
    return np.zeros((1, dim), np.float32)
  rows = [np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim) for w in tokens]
  return (np.stack(rows) / np.sqrt(dim)).astype(np.float32)


class T5Features:
  """A local transformers T5 directory (a T5EncoderModel or a whole T5, with its tokenizer) -> per-caption encoder
  states. Read from disk only (no download)."""

  def __init__(self, directory: str, max_tokens: int = 100, batch_size: int = 16):
    from star_jax.errors import UserError
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
      raise UserError(f"--text-encoder {directory}: no config.json; pass a local T5 / FLAN-T5 directory")
    with open(config) as f:
      self.dim = int(json.load(f)["d_model"])
    import torch
    from transformers import AutoTokenizer, T5EncoderModel
    self._torch = torch
    self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    self.model = T5EncoderModel.from_pretrained(directory, local_files_only=True, use_safetensors=None).eval()
    self.max_tokens, self.batch_size = max_tokens, batch_size

  def __call__(self, captions: list[str]) -> list[np.ndarray]:
    """Captions -> one (valid tokens, d_model) float32 array each (the last hidden state where the mask is true)."""
    out = []
    for i in range(0, len(captions), self.batch_size):
      batch = self.tokenizer(captions[i:i + self.batch_size], max_length=self.max_tokens, truncation=True,
                             padding=True, return_tensors="pt")
      with self._torch.inference_mode():
        states = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
      for h, m in zip(states.float().numpy(), batch.attention_mask.numpy().astype(bool)):
        out.append(np.ascontiguousarray(h[m], np.float32))
    return out
