"""Every stage of every config variant builds: params by `jax.eval_shape` of its init, and its loss traced on the
batch the pipeline delivers (`plan.batch_spec`), raw and cached inputs, without allocating a parameter."""

import jax
import pytest

from star_jax import plan
from star_jax.config import load_config
from star_jax.constants import STAGES
from star_jax.errors import UserError
from star_jax.train.stage import build_stage


class _Labels:
  """What stage 1 asks its data for when `classifier.num_classes` is 0 (tiny); 527 labels as `plan.batch_spec`."""
  label_names = [f"class {i}" for i in range(527)]


@pytest.mark.parametrize("variant", ["tiny", "paper"])
@pytest.mark.parametrize("name", STAGES)
def test_stage_initialises_and_its_loss_traces(name, variant):
  tiny_vae = (name, variant) == ("vae", "tiny")  # tiny's default codec is the fixed mel one: train its Oobleck
  cfg = load_config(f"configs/star.py:{variant}", ["vae.kind=oobleck"] if tiny_vae else [])
  stage = build_stage(cfg, name, _Labels())
  rng = jax.random.PRNGKey(0)
  model = jax.eval_shape(stage.init, rng)
  assert jax.tree.leaves(model["params"]), f"{name}/{variant} has no trainable params"
  for cached in (False, True) if variant == "tiny" else (False,):  # paper: the DiT-L trace is the cost
    batch = {k: jax.ShapeDtypeStruct(shape, dtype)
             for k, (shape, dtype) in plan.batch_spec(cfg, stage.batch_keys, 2, cached).items()}
    loss, metrics = jax.eval_shape(stage.loss, model["params"], model["frozen"], batch, rng)
    assert loss.shape == () and all(m.shape == () for m in metrics.values())


def test_context_slots_must_match_every_stage_that_feeds_the_dit():
  """The DiT's per-token slots meet 8 bridge tokens in stage 2 and the text rows in tta: one-line errors at load."""
  with pytest.raises(UserError, match="dit.context_slots=8 but data.text_max_tokens=16"):
    load_config("configs/star.py:tiny", ["data.text_max_tokens=16"])
  with pytest.raises(UserError, match="dit.context_slots=8 but the qformer bridge feeds stage 2 4 tokens"):
    load_config("configs/star.py:tiny", ["qformer.num_queries=4"])
  with pytest.raises(UserError, match="dit.context_dim=64 but the qformer bridge's tokens are 32 wide"):
    load_config("configs/star.py:tiny", ["qformer.output_size=32"])
  with pytest.raises(UserError, match="qformer.encoder_hidden_size=32 but hubert.hidden_size=48"):
    load_config("configs/star.py:tiny", ["hubert.hidden_size=48"])


def test_mlp_bridge_builds_stage2_frozen():
  """bridge.kind=mlp: stage 2 conditions on the MLP's single token, the whole bridge frozen (no projection)."""
  cfg = load_config("configs/star.py:tiny", ["bridge.kind=mlp", "dit.context_slots=0"])
  stage = build_stage(cfg, "stage2")
  model = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
  assert model["params"]["bridge"] == {} and set(model["frozen"]["bridge"]) == {"params", "batch_stats"}
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in plan.batch_spec(cfg, stage.batch_keys, 2, True).items()}
  loss, _ = jax.eval_shape(stage.loss, model["params"], model["frozen"], batch, jax.random.PRNGKey(0))
  assert loss.shape == ()
  stage1 = jax.eval_shape(build_stage(cfg, "stage1", _Labels()).init, jax.random.PRNGKey(0))
  assert set(stage1["frozen"]["bridge"]) == {"batch_stats"}  # stage 1 trains the MLP, its running statistics ride along
