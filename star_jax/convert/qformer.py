"""Q-Former checkpoints -> (QFormerConfig, params): transformers Blip2QFormerModel, or STAR/LAVIS state dicts.

    star-jax convert qformer --from star_bridge.pt --out ckpt/qformer         # STAR / LAVIS names
    star-jax convert qformer --from /path/to/blip2-dir --out ckpt/qformer     # transformers Blip2 directory
STAR/LAVIS names: `<prefix>Qformer.bert.embeddings.LayerNorm.*`, `...bert.encoder.layer.{i}.{attention,
crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}`, `...intermediate_query.dense`,
`...output_query.{dense,LayerNorm}`, `<prefix>query_tokens` (1, Q, H) and `hiddin_projection`.
The text-branch FFN (`intermediate`, `output`) is unused by query-only input and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from star_jax.convert.hubert import _to_numpy
from star_jax.errors import UserError
from star_jax.models.bridge import QFormerConfig

# Our attention blocks' names -> the transformers (Blip2) spelling; LAVIS uses `.self.` for `.attention.`.
_ATTN = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
         "output": "output.dense", "norm": "output.LayerNorm"}


def _np(v: Any) -> np.ndarray:
  return np.asarray(_to_numpy(v), np.float32)


def _linear(sd, name):
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _norm(sd, name):
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _params(sd: Mapping[str, np.ndarray], query_tokens: np.ndarray, projection: dict | None,
            config: QFormerConfig) -> dict:
  """Normalised transformers-style names (`layernorm`, `encoder.layer.{i}...`) -> our param tree."""
  params = {"query_tokens": query_tokens.reshape(config.num_queries, config.hidden_size)}
  try:
    if config.query_layer_norm:
      params["query_norm"] = _norm(sd, "layernorm")
    for i in range(config.num_layers):
      p = f"encoder.layer.{i}."
      blocks = {"self_attention": "attention"}
      if i % config.cross_attention_frequency == 0:
        blocks["cross_attention"] = "crossattention"
      layer = {}
      for ours, theirs in blocks.items():
        layer[ours] = {n: (_norm if n == "norm" else _linear)(sd, f"{p}{theirs}.{t}") for n, t in _ATTN.items()}
      layer["intermediate"] = _linear(sd, p + "intermediate_query.dense")
      layer["output"] = _linear(sd, p + "output_query.dense")
      layer["output_norm"] = _norm(sd, p + "output_query.LayerNorm")
      params[f"layer_{i}"] = layer
  except KeyError as e:
    raise UserError(f"qformer: the checkpoint lacks {e.args[0]!r} (names as in transformers' "
                    f"Blip2QFormerModel after mapping)") from e
  if projection is not None:
    params["projection"] = projection
  return params


def from_torch(qformer: Any, query_tokens: Any, projection: Any = None, **config_overrides
               ) -> tuple[QFormerConfig, dict]:
  """transformers Blip2QFormerModel + its (1, Q, H) queries [+ torch.nn.Linear] -> (QFormerConfig, params)."""
  hf = qformer.config
  queries = _np(query_tokens)
  proj = None if projection is None else {"kernel": _np(projection.weight).T, "bias": _np(projection.bias)}
  fields = dict(num_queries=queries.shape[-2], hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
                intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                cross_attention_frequency=hf.cross_attention_frequency,
                encoder_hidden_size=hf.encoder_hidden_size, output_size=0 if proj is None else proj["kernel"].shape[1],
                layer_norm_eps=hf.layer_norm_eps, dropout_rate=hf.hidden_dropout_prob)
  if hf.hidden_act != "gelu":
    raise UserError(f"qformer: hidden_act {hf.hidden_act!r} is not supported (BLIP-2 uses exact 'gelu')")
  fields.update(config_overrides)
  config = QFormerConfig(**fields)
  sd = {k: _np(v) for k, v in qformer.state_dict().items()}
  return config, _params(sd, queries, proj, config)


def _cross_frequency(cross_layers: set[int], num_layers: int) -> int:
  for f in range(1, num_layers + 1):
    if {i for i in range(num_layers) if i % f == 0} == cross_layers:
      return f
  raise UserError(f"qformer: cross-attention in layers {sorted(cross_layers)} is not every f-th layer")


def _infer_config(sd: Mapping[str, np.ndarray], queries: np.ndarray, proj: dict | None, **overrides
                  ) -> QFormerConfig:
  try:
    return _infer_config_or_raise(sd, queries, proj, **overrides)
  except KeyError as e:
    raise UserError(f"qformer: the checkpoint lacks {e.args[0]!r}") from e


def _infer_config_or_raise(sd, queries, proj, **overrides) -> QFormerConfig:
  layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  if not layers:
    raise UserError("qformer: no `encoder.layer.{i}` weights found in the checkpoint")
  num_layers = max(layers) + 1
  cross = {i for i in layers if f"encoder.layer.{i}.crossattention.attention.key.weight" in sd}
  hidden = queries.shape[-1]
  fields = dict(num_queries=queries.shape[-2], hidden_size=hidden, num_heads=max(hidden // 64, 1),  # BERT: 64/head
                intermediate_size=sd["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                num_layers=num_layers, cross_attention_frequency=_cross_frequency(cross, num_layers),
                encoder_hidden_size=sd["encoder.layer.0.crossattention.attention.key.weight"].shape[1]
                if 0 in cross else hidden,
                output_size=0 if proj is None else proj["kernel"].shape[1],
                query_layer_norm="layernorm.weight" in sd)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return QFormerConfig(**fields)


def from_star_state_dict(state_dict: Mapping[str, Any], **config_overrides) -> tuple[QFormerConfig, dict]:
  """STAR/LAVIS Q-Former state dict (any `...Qformer.` prefix) -> (QFormerConfig, params).

  Sizes come from the tensors; the head count is not stored, so it defaults to BERT's 64 dims per head
  (pass `num_heads=` otherwise).
  """
  sd, queries, proj = {}, None, None
  for k, v in state_dict.items():
    if (m := re.search(r"Qformer\.bert\.(.*)$", k)):
      name = m.group(1).replace("embeddings.LayerNorm", "layernorm").replace(".attention.self.", ".attention.attention.")
      sd[name.replace(".crossattention.self.", ".crossattention.attention.")] = _np(v)
    elif k.endswith("query_tokens"):
      queries = _np(v)
    elif k.endswith("hiddin_projection.weight"):
      proj = {"kernel": _np(v).T, "bias": _np(state_dict[k.removesuffix("weight") + "bias"])}
  if queries is None or not sd:
    raise UserError("qformer: not a STAR/LAVIS Q-Former checkpoint (need `...Qformer.bert.*` and `query_tokens`)")
  config = _infer_config(sd, queries, proj, **config_overrides)
  return config, _params(sd, queries, proj, config)


def classifier_from_star_state_dict(state_dict: Mapping[str, Any]) -> tuple[int, dict]:
  """STAR's stage-1 head (`projection.{weight,bias}`, hidden -> labels) -> (num_classes, Classifier params)."""
  key = next((k for k in state_dict
              if k == "projection.weight" or (k.endswith(".projection.weight") and "Qformer" not in k)), None)
  if key is None:
    raise UserError("qformer: no stage-1 classifier (`projection.weight`) in the checkpoint")
  kernel = _np(state_dict[key]).T
  return kernel.shape[1], {"projection": {"kernel": kernel, "bias": _np(state_dict[key.removesuffix("weight") + "bias"])}}


def from_hf_dir(directory: str, extra: Mapping[str, Any] | None = None, **config_overrides
                ) -> tuple[QFormerConfig, dict]:
  """A local transformers directory -> (QFormerConfig, params): a Blip2Model (`qformer.*`, `query_tokens`), or a
  Blip2QFormerModel (no prefix) whose `query_tokens` (1, Q, H) and optional output `projection.{weight,bias}`
  (H -> D; `hiddin_projection.*` in STAR's spelling) come in `extra`, a state dict."""
  from star_jax.convert.torch_io import load_state_dict

  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise UserError(f"qformer: '{directory}' has no config.json; pass a transformers Blip2 directory")
  with open(config_path) as f:
    hf = json.load(f)
  hf = hf.get("qformer_config", hf)
  path = next((os.path.join(directory, n) for n in ("model.safetensors", "pytorch_model.bin")
               if os.path.isfile(os.path.join(directory, n))), None)
  if path is None:
    raise UserError(f"qformer: '{directory}' has neither model.safetensors nor pytorch_model.bin")
  raw = dict(load_state_dict(path), **(extra or {}))
  sd = {k.removeprefix("qformer."): v for k, v in raw.items() if k.startswith("qformer.")} or raw
  if "query_tokens" not in raw:
    raise UserError(f"qformer: neither '{path}' nor the extra state dict holds `query_tokens` (1, Q, H); a "
                    f"Blip2QFormerModel directory needs them beside it")
  proj = next(({"kernel": _np(raw[n + ".weight"]).T, "bias": _np(raw[n + ".bias"])}
               for n in ("projection", "hiddin_projection") if n + ".weight" in raw), None)
  overrides = dict(num_heads=hf.get("num_attention_heads", 12), layer_norm_eps=hf.get("layer_norm_eps", 1e-12))
  overrides.update(config_overrides)
  config = _infer_config(sd, _np(raw["query_tokens"]), proj, **overrides)
  return config, _params(sd, _np(raw["query_tokens"]), proj, config)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--num-heads", type=int, default=None,
                 help="attention heads (STAR/LAVIS checkpoints do not store it; default hidden/64, BERT's)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")


def convert_cli(args: argparse.Namespace) -> tuple[QFormerConfig, dict]:
  overrides = dict(num_heads=args.num_heads, dtype=args.dtype)
  if os.path.isdir(args.source):
    return from_hf_dir(args.source, **{k: v for k, v in overrides.items() if v is not None})
  from star_jax.convert.torch_io import load_state_dict
  return from_star_state_dict(load_state_dict(args.source), **overrides)
