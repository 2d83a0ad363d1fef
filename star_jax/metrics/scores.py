"""The paper's scores on arrays: mAP, Fréchet distance, KL, inception score, CLAP cosine.

Everything here is float64 numpy on small arrays (one row per clip or per embedding frame); the models
that produce the rows live in `cnn14.py`, `vggish.py` and `clap.py`. Formulas follow audioldm_eval,
which STAR and the systems it compares with use for AudioCaps (see each function).
"""

from __future__ import annotations

import numpy as np

from star_jax.errors import UserError


def average_precision(labels_nc: np.ndarray, scores_nc: np.ndarray) -> np.ndarray:
  """Per-class average precision (N, C) x (N, C) -> (C,); NaN for a class without positives.

  AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, high to low (tied scores form
  one threshold): scikit-learn's `average_precision_score`, without interpolation.
  """
  labels_nc = np.asarray(labels_nc) > 0
  scores_nc = np.asarray(scores_nc, np.float64)
  if labels_nc.shape != scores_nc.shape or labels_nc.ndim != 2:
    raise ValueError(f"labels {labels_nc.shape} and scores {scores_nc.shape} must both be (N, C)")
  ap_c = np.full(labels_nc.shape[1], np.nan)
  for c in range(labels_nc.shape[1]):
    positives = labels_nc[:, c].sum()
    if positives == 0:
      continue
    order = np.argsort(-scores_nc[:, c], kind="stable")
    score_n, hit_n = scores_nc[order, c], labels_nc[order, c]
    # Last index of each run of equal scores: where the threshold sits.
    last = np.r_[np.nonzero(np.diff(score_n))[0], len(score_n) - 1]
    tp = np.cumsum(hit_n)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0, tp]) / positives
    ap_c[c] = np.sum(recall_gain * precision)
  return ap_c


def mean_average_precision(labels_nc: np.ndarray, scores_nc: np.ndarray) -> float:
  """mAP as STAR computes it: the mean AP over the classes with at least one positive (DESIGN.md §2).

  With no positive at all STAR's `get_map` returns 0.0, and so does this.
  """
  ap_c = average_precision(labels_nc, scores_nc)
  return 0.0 if np.all(np.isnan(ap_c)) else float(np.nanmean(ap_c))


def embedding_stats(emb_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) embeddings -> mean (D,) and unbiased covariance (D, D), as audioldm_eval and pytorch-fid."""
  emb_nd = np.asarray(emb_nd, np.float64)
  if emb_nd.ndim != 2 or emb_nd.shape[0] < 2:
    raise UserError(f"a Fréchet distance needs at least 2 embeddings per set, got {emb_nd.shape[0]}")
  return emb_nd.mean(0), np.cov(emb_nd, rowvar=False)


def _psd_sqrt(m_dd: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix via eigh (tiny negative eigenvalues clipped)."""
  w, v = np.linalg.eigh((m_dd + m_dd.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½) between two Gaussians.

  tr((C1 C2)^½) = tr((C1^½ C2 C1^½)^½), a symmetric PSD form that eigh handles stably even when C1 C2
  is singular (fewer clips than dimensions), where scipy's sqrtm needs an eps and returns complex noise.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
    raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covs {cov1.shape} vs {cov2.shape}")
  s1 = _psd_sqrt(cov1)
  middle = s1 @ cov2 @ s1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def frechet_distance(emb1_nd: np.ndarray, emb2_md: np.ndarray) -> float:
  """Fréchet distance between the Gaussians fitted to two embedding sets (N, D) and (M, D)."""
  return frechet_distance_from_stats(*embedding_stats(emb1_nd), *embedding_stats(emb2_md))


def _log_softmax(x_nc: np.ndarray) -> np.ndarray:
  x_nc = x_nc - x_nc.max(-1, keepdims=True)
  return x_nc - np.log(np.exp(x_nc).sum(-1, keepdims=True))


def _kl_sum(target_nc: np.ndarray, log_pred_nc: np.ndarray) -> float:
  """sum target * (log target - log_pred), 0·log 0 = 0: torch's kl_div(log_pred, target, 'sum')."""
  safe = np.where(target_nc > 0, target_nc, 1.0)
  return float(np.sum(np.where(target_nc > 0, target_nc * (np.log(safe) - log_pred_nc), 0.0)))


def kl_divergence(gen_logits_nc: np.ndarray, ref_logits_nc: np.ndarray, eps: float = 1e-6) -> dict[str, float]:
  """KL(reference ‖ generated) of paired classifier outputs, summed over classes, mean over pairs.

  As audioldm_eval's `calculate_kl`: the reference clip's distribution is the target, the generated
  clip's (+ eps inside the log) the prediction. 'softmax' normalises the logits over classes (what papers
  report as KL); 'sigmoid' treats each class as its own probability (audioldm_eval's KL_Sigmoid).
  """
  gen = np.asarray(gen_logits_nc, np.float64)
  ref = np.asarray(ref_logits_nc, np.float64)
  if gen.shape != ref.shape or gen.ndim != 2:
    raise ValueError(f"paired logits must have equal (N, C) shapes, got {gen.shape} and {ref.shape}")
  n = gen.shape[0]
  p_gen, p_ref = np.exp(_log_softmax(gen)), np.exp(_log_softmax(ref))
  s_gen, s_ref = 1 / (1 + np.exp(-gen)), 1 / (1 + np.exp(-ref))
  return {"softmax": _kl_sum(p_ref, np.log(p_gen + eps)) / n,
          "sigmoid": _kl_sum(s_ref, np.log(s_gen + eps)) / n}


def inception_score(logits_nc: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
  """Inception score over softmax(logits): mean and std over `splits` chunks of exp(E_x KL(p(y|x) ‖ p(y))).

  As audioldm_eval's `calculate_isc`: rows shuffled by `RandomState(seed)`, chunk i is rows
  [i·N/splits, (i+1)·N/splits). With fewer rows than splits, each row is its own chunk.
  """
  logits = np.asarray(logits_nc, np.float64)
  n = logits.shape[0]
  if n == 0:
    raise UserError("the inception score needs at least one clip")
  logits = logits[np.random.RandomState(seed).permutation(n)]
  log_p = _log_softmax(logits)
  p = np.exp(log_p)
  splits = min(splits, n)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    log_marginal = np.log(p[lo:hi].mean(0, keepdims=True))
    scores.append(np.exp(np.sum(p[lo:hi] * (log_p[lo:hi] - log_marginal), axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def cosine_similarity(a_nd: np.ndarray, b_nd: np.ndarray) -> np.ndarray:
  """Row-wise cosine between paired embeddings (N, D) x (N, D) -> (N,)."""
  a = np.asarray(a_nd, np.float64)
  b = np.asarray(b_nd, np.float64)
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return np.sum(a * b, axis=-1)
