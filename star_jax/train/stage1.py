"""Stage 1: HuBERT -> bridge -> sound-event classifier with BCE; validation mAP each epoch drives early
stopping (DESIGN.md §1-2). HuBERT trains too when `stage1.train_hubert` (tiny configs), else it is frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from star_jax import sharding, trained
from star_jax.metrics.scores import mean_average_precision
from star_jax.models import build as build_lib
from star_jax.train.stage import Stage
from star_jax.train.state import FROZEN_UPDATES


def _modules(cfg, num_classes: int):
  """Stage 1's modules: HuBERT, the bridge and the classifier head."""
  return build_lib.hubert(cfg), build_lib.bridge(cfg), build_lib.classifier(cfg, num_classes)


def classify(cfg, parts: dict, speech_nt: np.ndarray, mask_nt: np.ndarray, num_classes: int,
             batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """A trained stage 1 (`trained.load_trained` parts: hubert, bridge, classifier) on host waveforms, in
  batches of one shape: (bridge tokens (N, Q, D), class probabilities (N, C)) as numpy."""
  hubert, bridge, head = _modules(cfg, num_classes)

  @jax.jit
  def forward(p, speech, mask):
    tokens = build_lib.speech_tokens(cfg, p, {"speech": speech, "speech_mask": mask}, modules=(hubert, bridge))
    return tokens, jax.nn.sigmoid(head.apply({"params": p["classifier"]}, tokens))

  p = {k: parts[k] for k in ("hubert", "bridge", "classifier")}
  tokens, probs = [], []
  for i in range(0, len(speech_nt), batch_size):
    n = len(speech_nt[i:i + batch_size])
    t, pr = forward(p, _pad(speech_nt[i:i + batch_size], batch_size), _pad(mask_nt[i:i + batch_size], batch_size))
    tokens.append(np.asarray(t)[:n])
    probs.append(np.asarray(pr)[:n])
  return np.concatenate(tokens), np.concatenate(probs)


def build(cfg, data=None) -> Stage:
  hp = cfg.stage1
  hubert, bridge, head = _modules(cfg, build_lib.num_classes(cfg, data))
  train_hubert = bool(hp.train_hubert)

  def init(rng):
    r_hub, r_bridge, r_head = jax.random.split(rng, 3)
    hub = hubert.init(r_hub, jnp.zeros((1, 4000)))["params"]  # param shapes do not depend on length
    params = {"bridge": build_lib.init_bridge(cfg, bridge, r_bridge),
              "classifier": head.init(r_head, jnp.zeros((1, *build_lib.bridge_tokens(cfg))))["params"]}
    frozen = {}
    if cfg.bridge.kind == "mlp":  # BatchNorm's running statistics are state the step writes, not gradient-trained
      frozen["bridge"] = {"batch_stats": params["bridge"].pop("batch_stats")}
    (params if train_hubert else frozen)["hubert"] = hub
    return {"params": params, "frozen": frozen}

  def speech_parts(params, frozen):
    return {"hubert": params["hubert"] if train_hubert else frozen["hubert"],
            "bridge": {**params["bridge"], **frozen.get("bridge", {})}}

  def loss(params, frozen, batch, rng):
    tokens, bridge_updates = build_lib.speech_tokens_training(
        cfg, speech_parts(params, frozen), batch, rng, use_cache=not train_hubert, modules=(hubert, bridge))
    logits = head.apply({"params": params["classifier"]}, tokens)
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()
    return bce, {"bce": bce, **({FROZEN_UPDATES: {"bridge": bridge_updates}} if bridge_updates else {})}

  @jax.jit
  def predict(params, frozen, batch):
    tokens = build_lib.speech_tokens(cfg, speech_parts(params, frozen), batch, use_cache=not train_hubert,
                                     modules=(hubert, bridge))
    return jax.nn.sigmoid(head.apply({"params": params["classifier"]}, tokens))

  def evaluate(state, data, mesh) -> dict:
    """mAP and BCE on the validation split, every example once, over all processes: each runs the same
    number of batches (short or missing local batches padded and masked) and the scores are gathered."""
    local_bs = int(hp.batch_size) // jax.process_count()
    split = hp.get("eval_split", "valid")
    it = iter(data.iterator(split, batch_size=local_bs, shuffle=False, num_epochs=1, seed=0,
                            drop_remainder=False))
    keys = ("speech", "speech_mask", "labels", "hubert", "hubert_mask")
    labels, scores, template = [], [], None
    while True:
      batch = next(it, None)
      n = 0 if batch is None else len(batch["labels"])
      counts = _all_processes(np.int32(n))  # one collective per batch keeps the processes in step
      if counts.max() == 0:
        break
      if template is None and counts.min() == 0:
        raise UserError(f"stage1: the '{split}' split has fewer examples than the {len(counts)} processes")
      if n:
        template = {k: np.asarray(v)[:1] for k, v in batch.items() if k in keys}
      local = {k: _pad(np.asarray(batch[k]) if n else template[k], local_bs) for k in template}
      valid = np.arange(local_bs) < n
      with jax.set_mesh(mesh):
        probs = predict(state.params, state.frozen, sharding.global_batch(local, mesh))
        rows = sharding.global_batch({"labels": local["labels"], "valid": valid}, mesh)
      keep = _gather(rows["valid"])
      scores.append(_gather(probs)[keep])
      labels.append(_gather(rows["labels"])[keep])
    labels_nc, scores_nc = np.concatenate(labels), np.concatenate(scores)
    eps = 1e-7
    bce = -np.mean(labels_nc * np.log(scores_nc + eps) + (1 - labels_nc) * np.log(1 - scores_nc + eps))
    m_ap = mean_average_precision(labels_nc, scores_nc)
    return {"score": m_ap, "mAP": m_ap, "bce": float(bce), "examples": len(labels_nc)}

  def load_pretrained(state):
    if not hp.get("init_hubert"):
      return state
    tree = "params" if train_hubert else "frozen"
    loaded = trained.put_like(trained.component(hp.init_hubert, "hubert"),
                                 getattr(state, tree)["hubert"], "stage1.init_hubert")
    return state.replace(**{tree: {**getattr(state, tree), "hubert": loaded}})

  return Stage(name="stage1", hparams=hp, init=init, loss=loss, evaluate=evaluate,
               load_pretrained=load_pretrained,
               batch_keys=("speech", "speech_mask", "labels", "hubert", "hubert_mask"))


def _all_processes(x: np.ndarray) -> np.ndarray:
  """A host value from every process, stacked (process_count, ...)."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape((jax.process_count(),) + np.shape(x))


def _gather(x: jax.Array) -> np.ndarray:
  """A global array (possibly spread over hosts) as one numpy array on every host."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Pad the batch axis to `size` with copies of the first row (their outputs are dropped)."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])
