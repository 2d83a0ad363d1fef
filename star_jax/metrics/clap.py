"""CLAP score: cosine between the CLAP text embedding of a caption and the audio embedding of its clip.

Runs a `transformers.ClapModel` and its `ClapProcessor` from a local directory (e.g. a download of
laion/clap-htsat-unfused) in PyTorch; nothing is fetched from a hub. The score is the mean over clips
of the cosine in [-1, 1] (some papers print it x100).
"""

from __future__ import annotations

import numpy as np

from star_jax.errors import UserError
from star_jax.metrics.scores import cosine_similarity


def _pooled(out):
  # transformers 5 returns the model output with a normalised pooler_output; 4.x returned the tensor.
  return getattr(out, "pooler_output", out)


class ClapScorer:
  """Text and audio embeddings of a local ClapModel directory; `score(captions, wavs)` -> per-pair cosine."""

  def __init__(self, model_dir: str, batch_size: int = 8):
    import torch
    from transformers import ClapModel, ClapProcessor

    try:
      self.model = ClapModel.from_pretrained(model_dir, local_files_only=True).eval()
      self.processor = ClapProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
      raise UserError(f"'{model_dir}' is not a local ClapModel + ClapProcessor directory: {e}") from e
    self.torch = torch
    self.sample_rate_hz = int(self.processor.feature_extractor.sampling_rate)
    self.batch_size = batch_size

  def text_embeddings(self, captions: list[str]) -> np.ndarray:
    """Captions -> (N, D) projected text embeddings."""
    out = []
    for i in range(0, len(captions), self.batch_size):
      tok = self.processor.tokenizer(captions[i:i + self.batch_size], padding=True, return_tensors="pt")
      with self.torch.no_grad():
        out.append(_pooled(self.model.get_text_features(**tok)).numpy())
    return np.concatenate(out)

  def audio_embeddings(self, wavs: list[np.ndarray]) -> np.ndarray:
    """Mono clips at `sample_rate_hz` -> (N, D) projected audio embeddings."""
    out = []
    for i in range(0, len(wavs), self.batch_size):
      feats = self.processor.feature_extractor([np.asarray(w, np.float32) for w in wavs[i:i + self.batch_size]],
                                               sampling_rate=self.sample_rate_hz, return_tensors="pt")
      with self.torch.no_grad():
        out.append(_pooled(self.model.get_audio_features(**feats)).numpy())
    return np.concatenate(out)

  def score(self, captions: list[str], wavs: list[np.ndarray]) -> np.ndarray:
    """Paired captions and clips -> (N,) cosine similarities."""
    if len(captions) != len(wavs):
      raise ValueError(f"{len(captions)} captions for {len(wavs)} clips")
    return cosine_similarity(self.text_embeddings(captions), self.audio_embeddings(wavs))
