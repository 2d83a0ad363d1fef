"""Which logical axes each kernel of HuBERT, Q-Former, DiT and VAE gets, and where the config puts them.

Megatron-style tensor parallelism: a block's first matmul splits its output (`heads`, `mlp`) over
`tensor` and the second its input, so a block needs one reduction; FSDP splits `embed`, `kv` and
`conv_in` over `fsdp` (and any other kernel on its largest free dimension, e.g. the DiT's LoRA).
These tables pin that down per component; the paper sizes then shard evenly.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from star_jax import plan, sharding
from star_jax.config import load_config

for _module in ("hubert", "bridge", "dit", "vae"):
  pytest.importorskip(f"star_jax.models.{_module}")

LOGICAL_NAMES = {"batch", "length", "embed", "mlp", "heads", "kv", "conv_in", "conv_out", "vocab"}

TABLE = {  # component -> (param path pattern, its kernel's logical axes)
    "hubert": [
        (r"layer_\d+/attention/[qkv]_proj/kernel", ("embed", "heads")),
        (r"layer_\d+/attention/out_proj/kernel", ("heads", "embed")),
        (r"layer_\d+/feed_forward/intermediate_dense/kernel", ("embed", "mlp")),
        (r"layer_\d+/feed_forward/output_dense/kernel", ("mlp", "embed")),
        (r"feature_extractor/conv_[1-6]/kernel", (None, "conv_in", "conv_out")),
        (r"feature_projection/kernel", ("conv_in", "embed")),
    ],
    "qformer": [
        (r"layer_\d+/(self|cross)_attention/query/kernel", ("embed", "heads")),
        (r"layer_\d+/(self|cross)_attention/(key|value)/kernel", ("kv", "heads")),
        (r"layer_\d+/(self|cross)_attention/output/kernel", ("heads", "embed")),
        (r"layer_\d+/intermediate/kernel", ("embed", "mlp")),
        (r"layer_\d+/output/kernel", ("mlp", "embed")),
        (r"projection/kernel", ("embed", "mlp")),
    ],
    "dit": [
        (r"(attn|cross_attn)/to_[qkv]/kernel", ("embed", "heads")),
        (r"(attn|cross_attn)/proj/kernel", ("heads", "embed")),
        (r"mlp/proj_(value|gate)/kernel", ("embed", "mlp")),
        (r"mlp/proj_out/kernel", ("mlp", "embed")),
        (r"context_embed_1/kernel", ("embed", "mlp")),
        (r"context_slot_proj", (None, None, "embed")),
        (r"final_conv/kernel", (None, "conv_in", "conv_out")),
    ],
    "vae": [
        (r"(encoder/(conv_out|block_\d+/.*conv\w*)|decoder/(conv_in|block_\d+/.*conv\w*))/kernel",
         (None, "conv_in", "conv_out")),
        # one audio channel in or out: nothing to split there
        (r"encoder/conv_in/kernel", (None, None, "conv_out")),
        (r"decoder/conv_out/kernel", (None, "conv_in", None)),
    ],
}


def _abstract_params(cfg, name):
  """eval_shape of a component's init for `cfg` -> boxed abstract params (nothing allocated)."""
  from star_jax.models import bridge, dit, hubert, vae
  rng = jax.random.key(0)
  if name == "hubert":
    model = hubert.Hubert(hubert.HubertConfig(**cfg.hubert.to_dict()))
    init = lambda: model.init(rng, jnp.zeros((1, 4000)))
  elif name == "qformer":
    model = bridge.QFormer(bridge.QFormerConfig(**cfg.qformer.to_dict()))
    init = lambda: model.init(rng, jnp.zeros((1, 4, cfg.hubert.hidden_size)))
  elif name == "dit":
    c = dit.DiTConfig(**cfg.dit.to_dict())
    init = lambda: dit.DiT(c).init(rng, jnp.zeros((1, 4, c.latent_channels)), jnp.zeros((1,)),
                                   jnp.zeros((1, c.context_slots or 3, c.context_dim)))
  else:
    c = vae.VAEConfig(**{k: v for k, v in cfg.vae.to_dict().items() if k != "kind"})  # tiny: Oobleck at its sizes
    init = lambda: vae.OobleckVAE(c).init(rng, jnp.zeros((1, 4 * vae.hop_length(c))))
  return jax.eval_shape(init)["params"]


def _named_leaves(boxed):
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


@pytest.fixture(scope="module")
def tiny_params():
  cfg = load_config("configs/star.py:tiny")
  return {name: _named_leaves(_abstract_params(cfg, name)) for name in TABLE}


@pytest.mark.parametrize("component", sorted(TABLE))
def test_every_kernel_has_logical_names(tiny_params, component):
  for path, leaf in tiny_params[component].items():
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    if value.ndim < 2:
      continue
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{component}: {path} has no logical axis names"
    assert len(leaf.names) == value.ndim, (path, leaf.names)
    assert set(leaf.names) - {None} <= LOGICAL_NAMES, (path, leaf.names)
    assert any(leaf.names), f"{component}: {path} {value.shape} can never be sharded"


@pytest.mark.parametrize("component", sorted(TABLE))
def test_kernel_axes_table(tiny_params, component):
  leaves = tiny_params[component]
  for pattern, names in TABLE[component]:
    matched = {p: l for p, l in leaves.items() if re.search(pattern, p)}
    assert matched, f"{component}: no param matches {pattern}"
    for path, leaf in matched.items():
      assert tuple(leaf.names) == names, (component, path, leaf.names)


def test_config_rules_map_every_name():
  for variant in ("tiny", "paper"):
    rules = dict(sharding.logical_rules(load_config(f"configs/star.py:{variant}").logical_axis_rules))
    assert LOGICAL_NAMES <= set(rules)
    assert rules["embed"] == rules["conv_in"] == rules["kv"] == "fsdp"  # FSDP: nearly every kernel has one
    assert rules["heads"] == rules["mlp"] == rules["conv_out"] == "tensor"


@pytest.mark.parametrize("component", sorted(TABLE))
def test_paper_sizes_shard_over_fsdp_and_tensor(component):
  """At the paper's sizes on fsdp=4 x tensor=2, each device holds ~1/8 of every component's params."""
  cfg = load_config("configs/star.py:paper")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  boxed = _abstract_params(cfg, component)
  shardings = sharding.tree_shardings(boxed, mesh, sharding.logical_rules(cfg.logical_axis_rules))
  tree = plan.abstract(nn.unbox(boxed), shardings)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  held = plan.per_device_bytes(tree)
  for leaf in jax.tree.leaves(tree):
    if leaf.ndim >= 2 and leaf.size >= 65536:  # every large kernel; a (10, 1, 512) conv cannot split
      assert "fsdp" in str(leaf.sharding.spec), (component, leaf.shape, leaf.sharding.spec)
  assert held <= total / 8 * 1.1, (component, held / total)
