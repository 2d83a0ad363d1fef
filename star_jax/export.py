"""Write an inference bundle: HuBERT, bridge, DiT and VAE params plus the config, as one orbax checkpoint.

  star-jax export --from outputs/tiny/stage2 --out outputs/tiny/bundle
  star-jax export --out bundle --hubert hubert-large-ll60k/ --bridge star_stage1.pt \\
      --dit ezaudio_s3_l.pt --dit-config ezaudio-l.yml --vae 1m.pt --vae-config vae/config.json
  star-jax generate --ckpt bundle --speech query.wav --out sound.wav

`--from` is a stage-2 workdir (it holds every component; its EMA weights are used when it kept them). Without it,
the four components come from `--hubert/--bridge/--dit/--vae` and the bundle's config is the paper recipe
(configs/star.py:paper) with their sizes. Each of them also replaces a `--from` component. Each takes:
  --hubert  a transformers HubertModel directory (config.json + model.safetensors / pytorch_model.bin)
  --bridge  STAR's stage-1 checkpoint (QformerBridgeNet: audio_Qformer.bert.*, audio_query_tokens,
            hiddin_projection.*), a Blip2Model directory, or a Blip2QFormerModel directory with --bridge-extra
            (a state dict holding its query_tokens and output projection.*)
  --dit     an EzAudio checkpoint ({"model": MaskDiT state dict}; --dit-config its ezaudio-*.yml), or a STAR stage-2
            checkpoint (backbone.*; its trained hiddin_projection replaces a checkpoint bridge's)
  --vae     a stable-audio-tools autoencoder checkpoint (EzAudio's 1m.pt; --vae-config its config.json), or a
            diffusers AutoencoderOobleck directory
and each a star-jax train workdir or a `star-jax convert` checkpoint. Files are read without executing code
(safetensors or torch.load(weights_only=True)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from star_jax.errors import UserError

COMPONENTS = ("hubert", "bridge", "dit", "vae")
# The config sections a star-jax source contributes for each component.
SECTIONS = {"hubert": ("hubert",), "bridge": ("bridge", "qformer", "mlp_bridge"), "dit": ("dit",), "vae": ("vae",)}
# `star-jax convert KIND` checkpoints: component -> its kind (the config it holds is that section).
CONVERTED_KIND = {"hubert": "hubert", "bridge": "qformer", "dit": "dit", "vae": "vae"}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--from", dest="source", default=None,
                 help="stage-2 train workdir, a folder or gs:// URL (omit it to assemble the bundle from the four "
                      "components)")
  p.add_argument("--out", required=True, help="bundle directory to write (a folder or gs:// URL)")
  for name in COMPONENTS:
    p.add_argument(f"--{name}", default=None, help=f"the {name}: a released checkpoint, or a workdir/checkpoint")
  p.add_argument("--bridge-extra", default=None,
                 help="with a Blip2QFormerModel --bridge: a state dict with query_tokens [+ projection.*]")
  p.add_argument("--dit-config", default=None, help="EzAudio's ckpts/ezaudio-*.yml for an EzAudio --dit")
  p.add_argument("--vae-config", default=None, help="stable-audio-tools config.json for a checkpoint-file --vae")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="compute dtype of converted components (default: the recipe's; float32 to compare "
                      "against another implementation)")


def read_run_config(workdir: str):
  """The config a train run wrote to `workdir/config.json`."""
  import ml_collections

  from star_jax import paths
  path = paths.run_path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"'{workdir}' has no config.json; is it a `star-jax train` workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _from_star_jax(path: str, name: str) -> tuple[dict, object, float | None]:
  """A star-jax workdir or converted checkpoint -> (config sections, params, latent scale or None)."""
  from star_jax import trained

  parts, kind = trained.load_trained(path)
  config = trained.trained_config(path) or {}
  if kind == CONVERTED_KIND[name] and kind in parts:
    sections = {CONVERTED_KIND[name]: config}
    if name == "bridge":
      sections["bridge"] = {"kind": "qformer"}
    return sections, parts[kind], None
  if name not in parts:
    raise UserError(f"'{path}' ({kind or 'unknown kind'}) has no '{name}' parameters; it has {sorted(parts)}")
  scale = config.get("flow", {}).get("latent_scale") if name == "dit" else None
  return {s: config[s] for s in SECTIONS[name] if s in config}, parts[name], scale


def load_component(name: str, path: str, args: argparse.Namespace, dtype: str = "float32"
                   ) -> tuple[dict, object, dict]:
  """One component from any source `export` accepts -> (config sections, params, extras); a converted one computes
  in `dtype`. extras may hold `latent_scale` (DiT) and `bridge_projection` (a STAR stage-2 DiT checkpoint's
  trained bridge projection)."""
  from star_jax import paths, trained
  from star_jax.convert import dit, hubert, qformer, vae

  if not paths.exists(path):
    raise UserError(f"--{name} '{path}' does not exist")
  if trained.is_trained(path):
    sections, params, scale = _from_star_jax(path, name)
    return sections, params, {} if scale is None else {"latent_scale": scale}
  overrides = {"dtype": dtype}
  extras: dict = {}
  if name == "hubert":
    if not os.path.isdir(path):
      raise UserError(f"--hubert '{path}': give a transformers HubertModel directory or a star-jax workdir")
    cfg, params = hubert.from_hf_dir(path, **overrides)
    section = "hubert"
  elif name == "bridge":
    from star_jax.convert.torch_io import load_state_dict
    if os.path.isdir(path):
      extra = load_state_dict(args.bridge_extra) if args.bridge_extra else None
      cfg, params = qformer.from_hf_dir(path, extra, **overrides)
    else:
      cfg, params = qformer.from_star_state_dict(load_state_dict(path), **overrides)
    section = "qformer"
  elif name == "dit":
    if os.path.isdir(path):
      raise UserError(f"--dit '{path}': give an EzAudio/STAR checkpoint file or a star-jax workdir")
    cfg, params, extras["latent_scale"] = dit.from_ezaudio_checkpoint(path, args.dit_config, **overrides)
    projection = _star_stage2_projection(path)
    if projection is not None:
      extras["bridge_projection"] = projection
    section = "dit"
  else:
    if os.path.isdir(path):
      cfg, params = vae.from_diffusers_dir(path)
    else:
      cfg, params = vae.from_stable_audio_checkpoint(path, args.vae_config)
    cfg = dataclasses.replace(cfg, **overrides)
    section = "vae"
  sections = {section: dataclasses.asdict(cfg)}
  if name == "bridge":
    sections["bridge"] = {"kind": "qformer"}
  return sections, params, extras


def _star_stage2_projection(path: str) -> dict | None:
  """STAR's stage 2 trains the bridge's `hiddin_projection` beside the DiT (DESIGN.md §2): that copy, if any."""
  from star_jax.convert.torch_io import load_state_dict

  sd = load_state_dict(path)
  keys = [k for k in sd if k.endswith("hiddin_projection.weight")]
  if len(keys) != 1:
    return None
  return {"kernel": sd[keys[0]].T, "bias": sd[keys[0].removesuffix("weight") + "bias"]}


def _paper_config():
  import configs.star

  from star_jax.config import load_config
  return load_config(f"{configs.star.__file__}:paper")


def export_bundle(source: str | None, out: str, overrides: dict[str, str] | None = None,
                  args: argparse.Namespace | None = None) -> str:
  """Collect the four components from `source` (a stage-2 workdir, or None: the paper recipe) and `overrides`
  ({component: path}) into one params checkpoint at `out`; the config takes each override's sizes."""
  import ml_collections

  from star_jax import trained
  from star_jax.checkpoint import save_params
  from star_jax.models import build

  args = args or argparse.Namespace(bridge_extra=None, dit_config=None, vae_config=None, dtype=None)
  cfg = read_run_config(source) if source else _paper_config()
  parts = trained.load_trained(source)[0] if source else {}
  projection = None
  for name, path in (overrides or {}).items():
    if not path:
      continue
    dtype = args.dtype or cfg[CONVERTED_KIND[name]].get("dtype", "float32")
    sections, parts[name], extras = load_component(name, path, args, dtype)
    with cfg.unlocked():
      for section, fields in sections.items():
        cfg[section] = ml_collections.ConfigDict(fields)
      if "latent_scale" in extras:
        cfg.flow.latent_scale = float(extras["latent_scale"])
    projection = extras.get("bridge_projection", projection)
  needed = [n for n in COMPONENTS if n != "vae" or build.vae_trained(cfg)]  # the mel codec has no params
  missing = [n for n in needed if n not in parts]
  if missing:
    raise UserError(f"{'--from ' + repr(source) + ' lacks' if source else 'missing'} {missing}: pass "
                    + " ".join(f"--{n} PATH" for n in missing))
  if projection is not None and overrides.get("bridge") and not trained.is_trained(overrides["bridge"]):
    parts["bridge"] = dict(parts["bridge"], projection=projection)
  _check_fits(cfg)
  return save_params(out, {n: parts[n] for n in needed}, cfg, kind="bundle")


def _check_fits(cfg) -> None:
  """The components must connect: HuBERT width -> bridge input, bridge output -> DiT context, DiT <-> VAE latents."""
  q = cfg.qformer if cfg.bridge.kind == "qformer" else None
  speech_in = q.encoder_hidden_size if q is not None else cfg.mlp_bridge.input_size
  tokens = (q.output_size or q.hidden_size) if q is not None else cfg.mlp_bridge.hidden_size
  problems = [f"{a} {x} but {b} {y}" for a, x, b, y in (
      ("hubert.hidden_size", cfg.hubert.hidden_size, "the bridge takes", speech_in),
      ("the bridge emits", tokens, "dit.context_dim", cfg.dit.context_dim),
      ("dit.latent_channels", cfg.dit.latent_channels, "vae.latent_channels", cfg.vae.latent_channels)) if x != y]
  if problems:
    raise UserError("export: the components do not fit together: " + "; ".join(problems))


def load_bundle(directory: str, sharding=None):
  """A bundle written by `export` -> (config, {hubert, bridge, dit, vae} params; no vae for the mel codec)."""
  import ml_collections

  from star_jax.checkpoint import load_params
  params, meta = load_params(directory, sharding)
  if meta.get("kind") != "bundle" or meta.get("config") is None:
    raise UserError(f"'{directory}' is not an inference bundle (kind '{meta.get('kind')}'); write one with "
                    f"`star-jax export --from STAGE2_WORKDIR --out DIR`")
  return ml_collections.ConfigDict(meta["config"]), params


def run(args: argparse.Namespace) -> int:
  out = export_bundle(args.source, args.out, {n: getattr(args, n) for n in COMPONENTS}, args)
  print(f"star-jax export: wrote {out}")
  return 0
