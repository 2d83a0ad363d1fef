"""A deterministic text embedding needing no model: one fixed random vector per word (hashed bag of words).

Word w maps to N(0, 1/dim) drawn from a generator seeded by crc32(w), so the same caption gives the same
(num_words, dim) sequence on every machine and run. It stands in for FLAN-T5 features in the `tta` stage
when no text encoder is at hand; its only structure is word identity (no order, no synonyms).
"""

from __future__ import annotations

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
