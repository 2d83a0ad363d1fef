"""`star-jax evaluate` end to end on tiny folders, with narrow random CNN14/VGGish checkpoints in the public
PyTorch layout and a tiny ClapModel; and the not-computed report when no model is given."""

import json
import os

import numpy as np
import pytest

from conftest import torch_or_skip
from star_jax.errors import UserError


def _star_jax(*argv):
  """`star-jax COMMAND ...` for the convert and evaluate commands, in process."""
  import argparse
  import importlib

  module = importlib.import_module({"convert": "star_jax.convert.cli", "evaluate": "star_jax.metrics.cli"}[argv[0]])
  parser = argparse.ArgumentParser(prog=f"star-jax {argv[0]}")
  module.add_arguments(parser)
  return module.run(parser.parse_args(list(argv[1:])))


def _narrow_cnn14_state_dict(rng):
  """Random tensors named and shaped like a PANNs CNN14 16 kHz checkpoint, with narrow conv widths."""
  from star_jax.metrics.cnn14 import mel_filters

  def bn(prefix, n):
    return {f"{prefix}.weight": 1 + 0.1 * rng.normal(size=n), f"{prefix}.bias": 0.1 * rng.normal(size=n),
            f"{prefix}.running_mean": 0.1 * rng.normal(size=n), f"{prefix}.running_var": 1 + rng.uniform(size=n)}

  sd = {"logmel_extractor.melW": mel_filters(16000, 512, 64, 50.0, 8000.0), **bn("bn0", 64)}
  cin = 1
  for i, w in enumerate((4, 4, 8, 8, 16, 16), start=1):
    sd[f"conv_block{i}.conv1.weight"] = rng.normal(size=(w, cin, 3, 3)) / np.sqrt(9 * cin)
    sd[f"conv_block{i}.conv2.weight"] = rng.normal(size=(w, w, 3, 3)) / np.sqrt(9 * w)
    sd.update(bn(f"conv_block{i}.bn1", w))
    sd.update(bn(f"conv_block{i}.bn2", w))
    cin = w
  sd.update({"fc1.weight": rng.normal(size=(16, 16)) / 4, "fc1.bias": np.zeros(16),
             "fc_audioset.weight": rng.normal(size=(527, 16)), "fc_audioset.bias": np.zeros(527)})
  return sd


def _narrow_vggish_state_dict(rng):
  """Random tensors in torchvggish's layout (features.{0,3,6,8,11,13}, embeddings.{0,2,4}), narrow."""
  sd, cin = {}, 1
  for idx, w in zip((0, 3, 6, 8, 11, 13), (4, 4, 8, 8, 8, 8)):
    sd[f"features.{idx}.weight"] = rng.normal(size=(w, cin, 3, 3)) / np.sqrt(9 * cin)
    sd[f"features.{idx}.bias"] = 0.1 * rng.normal(size=w)
    cin = w
  for idx, (n_in, n_out) in zip((0, 2, 4), ((8 * 6 * 4, 32), (32, 32), (32, 128))):
    sd[f"embeddings.{idx}.weight"] = rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)
    sd[f"embeddings.{idx}.bias"] = np.zeros(n_out)
  return sd


def _write_clips(directory, names, seed, rate=24000):
  import soundfile as sf
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i, name in enumerate(names):
    t = np.arange(int(rate * 1.5)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.normal(size=t.shape)
    sf.write(os.path.join(directory, name), wav.astype(np.float32), rate)


def test_evaluate_command_end_to_end(tmp_path, capsys):
  torch = torch_or_skip()
  from test_metrics_models import _tiny_clap_dir

  from star_jax.convert import cnn14 as convert_cnn14
  from star_jax.metrics import scores
  from star_jax.metrics.cnn14 import Cnn14Embedder
  from star_jax.metrics.embedding import read_audio, resample

  rng = np.random.default_rng(0)
  torch.save({"model": {k: torch.tensor(v, dtype=torch.float32) for k, v in _narrow_cnn14_state_dict(rng).items()}},
             tmp_path / "cnn14.pth")
  torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in _narrow_vggish_state_dict(rng).items()},
             tmp_path / "vggish.pth")
  _tiny_clap_dir(str(tmp_path / "clap"))
  names = ["a.wav", "b.wav", "c.wav"]
  _write_clips(tmp_path / "gen", names, seed=1)
  _write_clips(tmp_path / "ref", names, seed=2)
  (tmp_path / "captions.csv").write_text("file,caption\na,a dog barks\nb.wav,rain falls\n")

  # The converter CLI writes an orbax folder that evaluate reads like the .pth.
  assert _star_jax("convert", "cnn14", "--from", str(tmp_path / "cnn14.pth"), "--out", str(tmp_path / "cnn14_ckpt")) == 0
  out_json = tmp_path / "metrics.json"
  rc = _star_jax("evaluate", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--cnn14-ckpt", str(tmp_path / "cnn14_ckpt"), "--vggish-ckpt", str(tmp_path / "vggish.pth"),
                 "--clap-dir", str(tmp_path / "clap"), "--captions", str(tmp_path / "captions.csv"),
                 "--name", "tiny", "--out", str(out_json))
  assert rc == 0
  printed = capsys.readouterr().out
  assert "| System | FAD ↓ | FD ↓ | KL ↓ | IS ↑ | CLAP ↑ |" in printed and "| tiny |" in printed
  report = json.loads(out_json.read_text())
  assert report["not_computed"] == {}
  assert all(np.isfinite(report["values"][m]) for m in ("FAD", "FD", "KL", "IS", "CLAP"))
  assert report["details"]["num_paired"] == 3 and report["details"]["clap_clips"] == 2
  assert report["details"]["clap_uncaptioned"] == 1

  # FD and KL equal the scores of the embedder's outputs computed here directly.
  config, params = convert_cnn14.load(str(tmp_path / "cnn14.pth"))
  model = Cnn14Embedder(params, config)
  emb = {d: [model.embed(resample(*read_audio(str(tmp_path / d / n)), 16000)) for n in names] for d in ("gen", "ref")}
  stack = lambda d, k: np.concatenate([e[k] for e in emb[d]])  # noqa: E731
  assert report["values"]["FD"] == pytest.approx(scores.frechet_distance(stack("gen", 0), stack("ref", 0)), rel=1e-4)
  assert report["values"]["KL"] == pytest.approx(scores.kl_divergence(stack("gen", 1), stack("ref", 1))["softmax"],
                                                 rel=1e-4)


def test_evaluate_without_models_reports_why(tmp_path, capsys):
  _write_clips(tmp_path / "gen", ["x.wav", "y.wav"], seed=1, rate=16000)
  _write_clips(tmp_path / "ref", ["p.wav"], seed=2, rate=16000)
  assert _star_jax("evaluate", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref")) == 0
  printed = capsys.readouterr().out
  assert "| gen | – | – | – | – | – |" in printed
  report = json.loads((tmp_path / "gen" / "metrics.json").read_text())
  assert report["values"] == {m: None for m in ("FAD", "FD", "KL", "IS", "CLAP")}
  assert report["not_computed"]["FAD"] == "no --vggish-ckpt given"
  assert report["not_computed"]["CLAP"] == "no --clap-dir given"
  with pytest.raises(UserError, match="is not a directory"):
    _star_jax("evaluate", "--generated", str(tmp_path / "nope"), "--reference", str(tmp_path / "ref"))
