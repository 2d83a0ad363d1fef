"""Untrusted PyTorch checkpoints: weights load; pickled code never runs."""

import os
import pickle

import numpy as np
import pytest

from star_jax.convert.torch_io import load_state_dict
from star_jax.errors import UserError

torch = pytest.importorskip("torch")


class _Exploit:
  """Unpickling this would create a marker file: a stand-in for arbitrary code execution."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_state_dict_and_wrappers_load(tmp_path):
  sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.zeros(3), "steps": torch.tensor(7)}
  torch.save(sd, tmp_path / "plain.pt")
  torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
  for name in ("plain.pt", "lightning.ckpt"):
    out = load_state_dict(str(tmp_path / name))
    np.testing.assert_array_equal(out["a.weight"], sd["a.weight"].numpy())
    assert out["steps"] == 7


def test_safetensors_load(tmp_path):
  from safetensors.torch import save_file
  sd = {"w": torch.randn(2, 5)}
  save_file(sd, str(tmp_path / "m.safetensors"))
  np.testing.assert_array_equal(load_state_dict(str(tmp_path / "m.safetensors"))["w"], sd["w"].numpy())


def test_pickled_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with open(path, "wb") as f:
    pickle.dump({"w": _Exploit(str(marker))}, f)
  with pytest.raises(UserError, match="weights-only"):
    load_state_dict(str(path))
  assert not marker.exists()


def test_missing_and_garbage_files(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_state_dict(str(tmp_path / "nope.pt"))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(os.urandom(64))
  with pytest.raises(UserError, match="not a readable safetensors"):
    load_state_dict(str(junk))
