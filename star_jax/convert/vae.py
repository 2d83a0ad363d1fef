"""Oobleck VAE checkpoints -> (VAEConfig, params): diffusers `AutoencoderOobleck` or stable-audio-tools names.

  star-jax convert vae --from DIFFUSERS_DIR --out CKPT_DIR          (AutoencoderOobleck, or a pipeline's vae/)
  star-jax convert vae --from vae.ckpt --sample-rate 24000 --out CKPT_DIR   (stable-audio-tools / EzAudio)

Weight norm (`weight_g`/`weight_v`, or `parametrizations.weight.original0/1`) is folded to plain kernels,
w = g · v / ‖v‖ with the norm over all axes but the first (torch's default dim=0, also for transposed
convs, whose first axis is the input channel). torch kernels (O, I, K) / transposed (I, O, K) become
our (K, I, O).

stable-audio-tools names (an `autoencoder.` prefix is stripped), for n blocks, i < n, j < 3:
  encoder.layers.0                       conv k7           -> encoder/conv_in
  encoder.layers.{i+1}.layers.{j}        residual unit j   -> encoder/block_i/res_j
      .layers.{0,1,2,3}                  snake, conv k7, snake, conv k1 -> snake1, conv1, snake2, conv2
  encoder.layers.{i+1}.layers.{3,4}      snake, strided conv -> encoder/block_i/{snake,conv}
  encoder.layers.{n+1}, .layers.{n+2}    snake, conv k3    -> encoder/{snake_out,conv_out}
  decoder.layers.0                       conv k7           -> decoder/conv_in
  decoder.layers.{i+1}.layers.{0,1}      snake, transposed conv -> decoder/block_i/{snake,conv_t}
  decoder.layers.{i+1}.layers.{j+2}      residual unit j   -> decoder/block_i/res_j
  decoder.layers.{n+1}, .layers.{n+2}    snake, conv k7 (no bias) -> decoder/{snake_out,conv_out}
(the decoder's final tanh, off in Stable Audio Open and EzAudio, has no weights and is not supported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from star_jax.errors import UserError
from star_jax.models.vae import VAEConfig

_UNIT = ("snake1", "conv1", "snake2", "conv2")


def _diffusers_names(n: int) -> dict[str, str]:
  """Our module path -> diffusers module name, for n blocks."""
  names = {"encoder/conv_in": "encoder.conv1", "encoder/snake_out": "encoder.snake1",
           "encoder/conv_out": "encoder.conv2", "decoder/conv_in": "decoder.conv1",
           "decoder/snake_out": "decoder.snake1", "decoder/conv_out": "decoder.conv2"}
  for i in range(n):
    names[f"encoder/block_{i}/snake"] = f"encoder.block.{i}.snake1"
    names[f"encoder/block_{i}/conv"] = f"encoder.block.{i}.conv1"
    names[f"decoder/block_{i}/snake"] = f"decoder.block.{i}.snake1"
    names[f"decoder/block_{i}/conv_t"] = f"decoder.block.{i}.conv_t1"
    for side in ("encoder", "decoder"):
      for j in range(3):
        for leaf in _UNIT:
          names[f"{side}/block_{i}/res_{j}/{leaf}"] = f"{side}.block.{i}.res_unit{j + 1}.{leaf}"
  return names


def _stable_audio_names(n: int) -> dict[str, str]:
  """Our module path -> stable-audio-tools module name (see the module docstring), for n blocks."""
  names = {"encoder/conv_in": "encoder.layers.0", "encoder/snake_out": f"encoder.layers.{n + 1}",
           "encoder/conv_out": f"encoder.layers.{n + 2}", "decoder/conv_in": "decoder.layers.0",
           "decoder/snake_out": f"decoder.layers.{n + 1}", "decoder/conv_out": f"decoder.layers.{n + 2}"}
  for i in range(n):
    names[f"encoder/block_{i}/snake"] = f"encoder.layers.{i + 1}.layers.3"
    names[f"encoder/block_{i}/conv"] = f"encoder.layers.{i + 1}.layers.4"
    names[f"decoder/block_{i}/snake"] = f"decoder.layers.{i + 1}.layers.0"
    names[f"decoder/block_{i}/conv_t"] = f"decoder.layers.{i + 1}.layers.1"
    for j in range(3):
      for k, leaf in enumerate(_UNIT):
        names[f"encoder/block_{i}/res_{j}/{leaf}"] = f"encoder.layers.{i + 1}.layers.{j}.layers.{k}"
        names[f"decoder/block_{i}/res_{j}/{leaf}"] = f"decoder.layers.{i + 1}.layers.{j + 2}.layers.{k}"
  return names


class _Reader:
  """Reads folded weights from a state dict and remembers which names it used."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    self.used: set[str] = set()

  def take(self, name: str) -> np.ndarray:
    if name not in self.sd:
      raise UserError(f"VAE checkpoint: missing '{name}'")
    self.used.add(name)
    return self.sd[name]

  def weight(self, module: str) -> np.ndarray:
    """The torch-layout weight of `module`, with weight norm folded."""
    if f"{module}.weight" in self.sd:
      return self.take(f"{module}.weight")
    if f"{module}.weight_v" in self.sd:
      g, v = self.take(f"{module}.weight_g"), self.take(f"{module}.weight_v")
    else:
      g = self.take(f"{module}.parametrizations.weight.original0")
      v = self.take(f"{module}.parametrizations.weight.original1")
    norm = np.sqrt(np.sum(np.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))
    return v * (g.reshape((-1,) + (1,) * (v.ndim - 1)) / norm)

  def conv(self, module: str, transposed: bool = False, bias: bool = True) -> dict[str, np.ndarray]:
    w = self.weight(module)
    out = {"kernel": np.ascontiguousarray(w.transpose(2, 0, 1) if transposed else w.transpose(2, 1, 0))}
    if bias:
      out["bias"] = self.take(f"{module}.bias")
    return out

  def snake(self, module: str) -> dict[str, np.ndarray]:
    return {k: self.take(f"{module}.{k}").reshape(-1) for k in ("alpha", "beta")}


def _params(reader: _Reader, names: dict[str, str]) -> dict:
  """Our nested param dict from `names` (our module path -> source module name)."""
  params: dict = {}
  for path, source in names.items():
    leaf = path.rsplit("/", 1)[-1]
    if "snake" in leaf:
      value = reader.snake(source)
    else:
      value = reader.conv(source, transposed=leaf == "conv_t", bias=path != "decoder/conv_out")
    node = params
    for part in path.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[leaf] = value
  return params


def _check_all_used(reader: _Reader) -> None:
  left = sorted(k for k in reader.sd if k not in reader.used and k.startswith(("encoder.", "decoder.")))
  if left:
    raise UserError(f"VAE checkpoint: {len(left)} weights this Oobleck layout does not use, e.g. {left[:3]} "
                    f"(anti-aliased activations and ELU variants are not supported)")


def from_torch(model) -> tuple[VAEConfig, dict]:
  """A `diffusers.AutoencoderOobleck` -> (VAEConfig, params); the config comes from `model.config`."""
  c = model.config
  posterior = c.encoder_hidden_size // 2  # diffusers' encoder emits encoder_hidden_size = mean ‖ scale
  cfg = VAEConfig(
      sample_rate_hz=int(c.sampling_rate), audio_channels=int(c.audio_channels),
      encoder_hidden_size=int(c.encoder_hidden_size), decoder_channels=int(c.decoder_channels),
      channel_multiples=tuple(int(m) for m in c.channel_multiples),
      downsampling_ratios=tuple(int(r) for r in c.downsampling_ratios),
      latent_channels=int(c.decoder_input_channels),
      posterior_channels=0 if posterior == c.decoder_input_channels else posterior)
  reader = _Reader({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})
  params = _params(reader, _diffusers_names(len(cfg.downsampling_ratios)))
  _check_all_used(reader)
  return cfg, params


def _num_blocks(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  if not found or found != set(range(min(found), max(found) + 1)):
    raise UserError(f"VAE checkpoint: cannot find the encoder blocks (names like '{pattern}')")
  return len(found)


def _infer_config(params: dict, n: int, sample_rate_hz: int) -> VAEConfig:
  """Sizes from the kernel shapes (K, C_in, C_out); the decoder must mirror the encoder."""
  enc, dec = params["encoder"], params["decoder"]
  _, audio, hidden = enc["conv_in"]["kernel"].shape
  strides = [enc[f"block_{i}"]["conv"]["kernel"].shape[0] // 2 for i in range(n)]
  mults = [enc[f"block_{i}"]["conv"]["kernel"].shape[2] // hidden for i in range(n)]
  latent = dec["conv_in"]["kernel"].shape[1]
  posterior = enc["conv_out"]["kernel"].shape[2] // 2
  channels = dec["conv_out"]["kernel"].shape[1]
  cfg = VAEConfig(sample_rate_hz=sample_rate_hz, audio_channels=audio, encoder_hidden_size=hidden,
                  decoder_channels=channels, channel_multiples=tuple(mults),
                  downsampling_ratios=tuple(strides), latent_channels=latent,
                  posterior_channels=0 if posterior == latent else posterior)
  for i, s in enumerate(reversed(strides)):
    k, c_in, c_out = dec[f"block_{i}"]["conv_t"]["kernel"].shape
    want = ([channels] + [channels * m for m in mults])[n - i - 1: n - i + 1]
    if k != 2 * s or [c_out, c_in] != want:
      raise UserError(f"VAE checkpoint: decoder block {i} (kernel {k}, {c_in} -> {c_out} channels) does not "
                      f"mirror the encoder (strides {strides}, multiples {mults}); unsupported layout")
  return cfg


def from_stable_audio_state_dict(state_dict: Mapping[str, Any], sample_rate_hz: int = 24000
                                 ) -> tuple[VAEConfig, dict]:
  """stable-audio-tools / EzAudio VAE weights (or a diffusers-named state dict) -> (VAEConfig, params).

  Sizes are read from the weight shapes; the sample rate is not in the weights (EzAudio: 24 kHz).
  """
  sd = {k.removeprefix("autoencoder."): v for k, v in state_dict.items()}
  if any(k.startswith("encoder.block.") for k in sd):
    n = _num_blocks(sd, r"encoder\.block\.(\d+)\.")
    names = _diffusers_names(n)
  else:
    n = _num_blocks(sd, r"encoder\.layers\.(\d+)\.layers\.")
    names = _stable_audio_names(n)
  reader = _Reader(sd)
  params = _params(reader, names)
  _check_all_used(reader)
  return _infer_config(params, n, sample_rate_hz), params


def read_stable_audio_config(path: str) -> dict:
  """A stable-audio-tools autoencoder `config.json` (EzAudio's `ckpts/vae/config.json`) -> the VAEConfig fields it
  fixes; a layout star-jax does not build (no Oobleck, no `vae` bottleneck, a final tanh) is an error."""
  try:
    with open(path) as f:
      j = json.load(f)
    model = j["model"]
    enc, dec = model["encoder"], model["decoder"]
    bottleneck = model.get("bottleneck", {}).get("type")
    fields = dict(sample_rate_hz=int(j["sample_rate"]), audio_channels=int(enc["config"]["in_channels"]),
                  encoder_hidden_size=int(enc["config"]["channels"]), decoder_channels=int(dec["config"]["channels"]),
                  channel_multiples=tuple(enc["config"]["c_mults"]), downsampling_ratios=tuple(enc["config"]["strides"]),
                  latent_channels=int(dec["config"]["latent_dim"]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not a stable-audio-tools autoencoder config ({type(e).__name__}: {e})") from e
  unsupported = [what for what, bad in (
      ("encoder/decoder type other than oobleck", enc.get("type") != "oobleck" or dec.get("type") != "oobleck"),
      (f"bottleneck '{bottleneck}' (star-jax builds 'vae')", bottleneck != "vae"),
      ("final_tanh", dec["config"].get("final_tanh", False)),
      ("use_snake false", not enc["config"].get("use_snake", True) or not dec["config"].get("use_snake", True)),
      ("decoder sizes that do not mirror the encoder",
       (dec["config"].get("c_mults"), dec["config"].get("strides")) != (enc["config"]["c_mults"],
                                                                        enc["config"]["strides"])))
      if bad]
  if unsupported:
    raise UserError(f"{path}: {'; '.join(unsupported)}: not the Oobleck VAE star-jax builds")
  posterior = int(enc["config"]["latent_dim"]) // 2
  fields["posterior_channels"] = 0 if posterior == fields["latent_channels"] else posterior
  return fields


def from_stable_audio_checkpoint(path: str, config_path: str | None = None) -> tuple[VAEConfig, dict]:
  """A stable-audio-tools / EzAudio VAE checkpoint (`1m.pt`) [+ its `config.json`] -> (VAEConfig, params); the
  sizes in the config must be those of the weights. Without a config the rate is EzAudio's 24 kHz."""
  from star_jax.convert.torch_io import load_state_dict

  want = read_stable_audio_config(config_path) if config_path else {}
  cfg, params = from_stable_audio_state_dict(load_state_dict(path), want.get("sample_rate_hz", 24000))
  got = dataclasses.asdict(cfg)
  differ = {k: (got[k], v) for k, v in want.items() if got[k] != v}
  if differ:
    raise UserError(f"{path}: the weights do not have the sizes {config_path} gives: "
                    + ", ".join(f"{k} {a} in the weights, {b} in the config" for k, (a, b) in differ.items()))
  return cfg, params


def from_diffusers_dir(directory: str) -> tuple[VAEConfig, dict]:
  """A diffusers AutoencoderOobleck directory (or a pipeline directory with vae/) -> (VAEConfig, params)."""
  if os.path.isfile(os.path.join(directory, "vae", "config.json")):
    directory = os.path.join(directory, "vae")
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path) or json.load(open(config_path)).get("_class_name") != "AutoencoderOobleck":
    raise UserError(f"'{directory}' is not a diffusers AutoencoderOobleck directory (config.json with "
                    f"_class_name AutoencoderOobleck, directly or under vae/)")
  from diffusers import AutoencoderOobleck
  return from_torch(AutoencoderOobleck.from_pretrained(directory))


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--sample-rate", type=int, default=24000,
                 help="sample rate (Hz) of a checkpoint file; a diffusers directory carries its own")


def convert_cli(args: argparse.Namespace) -> tuple[VAEConfig, dict]:
  """--from: a diffusers AutoencoderOobleck directory (or a pipeline with vae/), or a .ckpt/.safetensors file."""
  if os.path.isdir(args.source):
    return from_diffusers_dir(args.source)
  from star_jax.convert.torch_io import load_state_dict
  return from_stable_audio_state_dict(load_state_dict(args.source), sample_rate_hz=args.sample_rate)
