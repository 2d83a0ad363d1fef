"""Every config file and variant loads, resolves its mesh and takes overrides."""

import glob
import importlib.util

import pytest

from star_jax import sharding
from star_jax.config import load_config
from star_jax.errors import UserError

CONFIG_FILES = sorted(glob.glob("configs/*.py"))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]


def _variants(path):
  spec = importlib.util.spec_from_file_location("cfg_probe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return getattr(mod, "VARIANTS", ("",))


CASES = [(f, v) for f in CONFIG_FILES for v in _variants(f)]


def test_there_are_configs():
  assert ("configs/star.py", "tiny") in CASES and ("configs/star.py", "paper") in CASES


@pytest.mark.parametrize("path,variant", CASES)
def test_config_loads(path, variant):
  cfg = load_config(f"{path}:{variant}" if variant else path)
  assert cfg.mesh and cfg.logical_axis_rules
  rules = sharding.logical_rules(cfg.logical_axis_rules)
  assert all(isinstance(name, str) for name, _ in rules)
  assert sum(sharding.mesh_shape(cfg.mesh.to_dict(), 8).values()) >= 3
  # model sections are consistent: the bridge feeds the DiT's context, HuBERT feeds the bridge
  assert cfg.qformer.encoder_hidden_size == cfg.hubert.hidden_size
  assert cfg.dit.context_dim == cfg.qformer.output_size
  assert cfg.hubert.hidden_size % cfg.hubert.num_heads == 0
  assert cfg.dit.hidden_size % cfg.dit.num_heads == 0


def test_paper_sizes_follow_design():
  cfg = load_config("configs/star.py:paper")
  assert (cfg.hubert.hidden_size, cfg.hubert.num_layers, cfg.hubert.num_heads) == (1024, 24, 16)
  assert (cfg.qformer.num_queries, cfg.qformer.num_layers, cfg.qformer.output_size) == (32, 2, 1024)
  assert (cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads, cfg.dit.lora_rank) == (1024, 24, 16, 32)
  assert cfg.stage1.lr == 3.2e-3 and cfg.stage2.lr == 2.5e-5 and cfg.stage2.batch_size == 16
  assert (cfg.flow.num_steps, cfg.flow.cfg_scale, cfg.flow.cond_drop_prob) == (20, 5.0, 0.2)


def test_overrides_and_errors():
  cfg = load_config("configs/star.py:tiny", ["dit.depth=6", "stage2.lr=1", "data.path=/tmp/x"])
  assert cfg.dit.depth == 6 and cfg.stage2.lr == 1.0 and isinstance(cfg.stage2.lr, float)
  assert cfg.data.path == "/tmp/x"
  with pytest.raises(UserError, match="no key 'dit.dept'"):
    load_config("configs/star.py:tiny", ["dit.dept=6"])
  with pytest.raises(UserError, match="unknown variant"):
    load_config("configs/star.py:huge")
  with pytest.raises(UserError, match="does not exist"):
    load_config("configs/nope.py:tiny")
  with pytest.raises(UserError, match="dit.latent_channels=64 but vae.latent_channels=32"):
    load_config("configs/star.py:tiny", ["vae.latent_channels=32"])
  cfg = load_config("configs/star.py:tiny", ["vae.latent_channels=32", "dit.latent_channels=32"])
  assert cfg.vae.latent_channels == cfg.dit.latent_channels == 32
