"""The demo's evaluator: trained on clean clips plus degraded copies, it names the event, not the coding."""

import numpy as np
import pytest

from star_jax.config import load_config
from star_jax.demo.evaluator import Evaluator, degrade, event_accuracy, paired_test
from star_jax.demo.report import report_md
from star_jax.demo.run import split_arrays, spread
from star_jax.errors import UserError
from tests.dataset_writer import write_split

RATE = 16000


def _tones(freqs_hz, per_class, rng, seconds=0.5):
  """Clips of a harmonic tone per class (random phase, level and onset) and their one-hot labels."""
  t = np.arange(int(seconds * RATE)) / RATE
  wavs, labels = [], []
  for c, f in enumerate(freqs_hz):
    for _ in range(per_class):
      x = sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3))
      x = x * rng.uniform(0.05, 0.3) * (t > rng.uniform(0, 0.1))
      wavs.append(x)
      labels.append(np.eye(len(freqs_hz))[c])
  return np.asarray(wavs, np.float32), np.asarray(labels, np.float32)


def test_degrade_is_seeded_and_keeps_the_shape():
  wav = np.random.default_rng(0).standard_normal((3, 4000)).astype(np.float32) * 0.1
  a, b = degrade(wav, RATE, np.random.default_rng(1)), degrade(wav, RATE, np.random.default_rng(1))
  assert a.shape == wav.shape and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, wav)


def test_evaluator_trained_with_degraded_copies_recognises_noisy_clips():
  rng = np.random.default_rng(0)
  freqs = (200, 450, 900, 1400)
  train_x, train_y = _tones(freqs, 12, rng)
  test_x, test_y = _tones(freqs, 5, rng)
  rms = np.sqrt(np.mean(test_x ** 2, axis=1, keepdims=True))
  noisy = (test_x + np.random.default_rng(3).standard_normal(test_x.shape) * rms * 0.1).astype(np.float32)  # 20 dB
  robust = Evaluator(RATE, augment_copies=2).fit(train_x, train_y)
  clean_only = Evaluator(RATE, augment_copies=0).fit(train_x, train_y)
  assert event_accuracy(robust, test_x, test_y) == event_accuracy(clean_only, test_x, test_y) == 1.0
  assert event_accuracy(robust, noisy, test_y) == 1.0
  assert event_accuracy(clean_only, noisy, test_y) < 0.75  # measured 0.45: what the degraded copies are for
  assert robust.embed(test_x).shape == (len(test_x), 128)


def test_evaluator_that_heard_a_rendering_recognises_rendered_clips():
  """The demo's second evaluator also trains on the VAE's renderings of the training clips (`extended`). Here the
  rendering is ring modulation at 2.5 kHz, which moves every partial: an evaluator that never heard it is lost,
  one that heard the training clips through it names the event of unseen rendered clips."""
  rng = np.random.default_rng(0)
  freqs = (200, 450, 900, 1400)
  train_x, train_y = _tones(freqs, 12, rng)
  test_x, test_y = _tones(freqs, 5, rng)
  render = lambda x: (x * np.sin(2 * np.pi * 2500 * np.arange(x.shape[1]) / RATE)).astype(np.float32)
  plain = Evaluator(RATE).fit(train_x, train_y)
  aware = plain.extended(render(train_x[::2]), train_y[::2])
  assert event_accuracy(aware, test_x, test_y) == 1.0  # still names the real clips
  assert event_accuracy(aware, render(test_x), test_y) >= 0.9
  assert event_accuracy(plain, render(test_x), test_y) <= 0.5  # measured 0.25 (chance)


def test_extended_evaluator_is_the_one_fit_on_both_sets():
  """`extended` reuses the features of its base evaluator: the same model as fitting the clips, their degraded
  copies and the extra clips from scratch."""
  rng = np.random.default_rng(3)
  x, y = _tones((300, 800), 4, rng)
  extra = x[::2] * 0.5
  base = Evaluator(RATE).fit(x, y)
  scratch = Evaluator(RATE)
  scratch._fit(np.concatenate([base.train_x, scratch.features(extra)]), np.concatenate([base.train_y, y[::2]]))
  np.testing.assert_array_equal(base.extended(extra, y[::2]).model.coefs_[0], scratch.model.coefs_[0])


def test_split_arrays_reads_a_split_in_order_and_names_missing_cached_fields(tmp_path):
  rng = np.random.default_rng(0)
  recs = [dict(id=f"r{i}", caption=f"sound {i}", labels=np.eye(3, dtype=np.uint8)[i % 3],
               speech=rng.uniform(-0.5, 0.5, 8000).astype(np.float32),
               audio=rng.uniform(-0.5, 0.5, 6000).astype(np.float32)) for i in range(5)]
  write_split(tmp_path, "train", recs, label_names=list("abc"), speech_sample_rate_hz=16000,
              audio_sample_rate_hz=16000)
  cfg = load_config("configs/star.py:tiny", [f"data.path={tmp_path}"])
  out = split_arrays(cfg, "train")
  assert list(out["id"]) == [r["id"] for r in recs]
  np.testing.assert_array_equal(out["audio"][2, :6000], recs[2]["audio"])
  assert list(split_arrays(cfg, "train", limit=3)["id"]) == ["r0", "r2", "r4"]
  assert list(spread(out, 5)["id"]) == list(spread(out, 9)["id"]) == list(out["id"])
  with pytest.raises(UserError, match="no hubert, latents.*prepare cache"):
    split_arrays(cfg, "train", keys=("labels", "latents", "hubert"))


def test_paired_test_counts_discordant_queries_and_gives_the_exact_binomial_tail():
  query = np.array([True] * 13 + [False] * 2 + [True] * 5 + [False] * 80)
  base = np.array([False] * 13 + [True] * 2 + [True] * 5 + [False] * 80)
  r = paired_test(query, base)
  assert (r["wins"], r["losses"]) == (13, 2)
  assert r["p_value"] == pytest.approx((105 + 15 + 1) / 2 ** 15)  # P(X >= 13), X ~ Binomial(15, 1/2)
  assert paired_test(base, query)["p_value"] > 0.99  # the other way round: no evidence
  assert paired_test(query & base, query & base) == {"wins": 0, "losses": 0, "p_value": 1.0}


def test_report_shows_counts_and_the_paired_tests():
  row = {"accuracy": 0.05, "accuracy_vae_aware": 0.1, "hits": 13, "hits_vae_aware": 26, "fd": 12.5}
  report = {"config": "configs/star.py:tiny", "devices": 1, "classes": 63, "queries": 261,
            "timings": {"corpus_s": 15.0}, "stages": {"vae": {"status": "done", "step": 500, "seconds": 209.0}},
            "stage1": {"test_mAP": 0.5, "chance_mAP": 0.04, "best_valid": {"step": 10, "mAP": 0.7},
                       "checkpoint": "last epoch"},
            "evaluator_train_clips": 1044, "generation": {"generated (spoken query)": row},
            "significance": {"random (evaluator)": {"wins": 13, "losses": 2, "p_value": 0.0037}}}
  md = report_md(report, {}, [], "/tmp")
  assert "| generated (spoken query) | 0.050 (13) | 0.100 (26) | 12.50 |" in md
  assert "| random (evaluator) | 13 | 2 | 0.0037 |" in md
  assert "use the last epoch's checkpoint" in md
  # A fixed codec (no trained VAE) has no VAE-aware evaluator: no such column.
  plain = {k: v for k, v in row.items() if not k.endswith("vae_aware")}
  md = report_md({**report, "generation": {"generated (spoken query)": plain}}, {}, [], "/tmp")
  assert "| generated (spoken query) | 0.050 (13) | 12.50 |" in md and "VAE-aware" not in md
