"""Each score against an independent computation: closed forms, scipy, scikit-learn, direct numpy loops."""

import numpy as np
import pytest
import scipy.linalg
from sklearn.metrics import average_precision_score

from star_jax.metrics import scores


def _scipy_frechet(x, y):
  """audioldm_eval / pytorch-fid: scipy's sqrtm of the covariance product."""
  mu1, mu2 = x.mean(0), y.mean(0)
  c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(c1 @ c2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)


def test_frechet_closed_form_for_gaussians():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  var1, var2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  # Covariances sharing eigenvectors: W^2 = ||mu1-mu2||^2 + sum (sqrt(l1) - sqrt(l2))^2.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  c1, c2 = (q * var1) @ q.T, (q * var2) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  assert scores.frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
  # Identical Gaussians are at distance 0; 1-D: (m1-m2)^2 + (s1-s2)^2.
  assert scores.frechet_distance_from_stats(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-9)
  assert scores.frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_matches_scipy_sqrtm_on_random_embeddings():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
  y = rng.normal(size=(150, 16)) * 2 + 0.5
  ours = scores.frechet_distance(x, y)
  assert ours == pytest.approx(_scipy_frechet(x, y), rel=1e-8)
  # Fewer clips than dimensions: C1 C2 is singular; the eigh form stays real and agrees with scipy.
  x, y = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 1
  assert scores.frechet_distance(x, y) == pytest.approx(_scipy_frechet(x, y), rel=1e-5)


def test_kl_matches_direct_formula():
  rng = np.random.default_rng(2)
  gen, ref = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
  soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  want_soft = np.mean([sum(soft(ref)[i, c] * np.log(soft(ref)[i, c] / (soft(gen)[i, c] + 1e-6))
                           for c in range(7)) for i in range(5)])
  want_sig = np.mean([sum(sig(ref)[i, c] * np.log(sig(ref)[i, c] / (sig(gen)[i, c] + 1e-6))
                          for c in range(7)) for i in range(5)])
  kl = scores.kl_divergence(gen, ref)
  assert kl["softmax"] == pytest.approx(want_soft, rel=1e-10)
  assert kl["sigmoid"] == pytest.approx(want_sig, rel=1e-10)
  assert scores.kl_divergence(ref, ref)["softmax"] == pytest.approx(0, abs=1e-5)  # only the eps remains


def test_inception_score_matches_direct_formula():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(23, 9)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  p = p[np.random.RandomState(2020).permutation(23)]
  per_split = []
  for i in range(10):
    chunk = p[i * 23 // 10:(i + 1) * 23 // 10]
    marginal = chunk.mean(0)
    per_split.append(np.exp(np.mean([np.sum(row * np.log(row / marginal)) for row in chunk])))
  mean, std = scores.inception_score(logits)
  assert mean == pytest.approx(np.mean(per_split), rel=1e-10)
  assert std == pytest.approx(np.std(per_split), rel=1e-9)
  # One confident class per clip, all classes used equally: IS = number of classes.
  assert scores.inception_score(np.eye(4) * 50, splits=1)[0] == pytest.approx(4, rel=1e-6)


def test_map_matches_sklearn_and_skips_classes_without_positives():
  rng = np.random.default_rng(4)
  labels = (rng.uniform(size=(40, 12)) < 0.25).astype(int)
  labels[:, 3] = 0                                  # no positive: left out of the mean
  scores_ = np.round(rng.uniform(size=(40, 12)), 1)  # many ties
  ap = scores.average_precision(labels, scores_)
  for c in range(12):
    if c == 3:
      assert np.isnan(ap[c])
    else:
      assert ap[c] == pytest.approx(average_precision_score(labels[:, c], scores_[:, c]), rel=1e-12)
  want = np.mean([average_precision_score(labels[:, c], scores_[:, c]) for c in range(12) if c != 3])
  assert scores.mean_average_precision(labels, scores_) == pytest.approx(want, rel=1e-12)
  assert scores.mean_average_precision(np.zeros((3, 2)), np.ones((3, 2))) == 0.0  # as STAR's get_map


def test_cosine_similarity():
  a = np.array([[1.0, 0], [1, 1], [0, 2]])
  b = np.array([[2.0, 0], [-1, -1], [1, 0]])
  np.testing.assert_allclose(scores.cosine_similarity(a, b), [1, -1, 0], atol=1e-12)
