"""Convert PyTorch / Hugging Face checkpoints to star-jax orbax checkpoints (params + config.json).

  star-jax convert hubert  --from HF_DIR --out CKPT_DIR
  star-jax convert qformer --from CKPT --out CKPT_DIR
  star-jax convert vae     --from CKPT --out CKPT_DIR
  star-jax convert dit     --from CKPT --out CKPT_DIR
  star-jax convert cnn14   --from Cnn14_16k_mAP=0.438.pth --out CKPT_DIR   (evaluation)
  star-jax convert vggish  --from vggish-10086976.pth --out CKPT_DIR       (evaluation)
Torch checkpoints are read with `torch.load(weights_only=True)` or safetensors, never a full unpickle.
"""

from __future__ import annotations

import argparse
import importlib

from star_jax.cli import module_exists

# kind -> (module with `add_cli_arguments(parser)` and `convert_cli(args) -> (config, params)`, help)
CONVERTERS = {
    "hubert": ("star_jax.convert.hubert", "a transformers HubertModel directory (e.g. hubert-large-ll60k)"),
    "qformer": ("star_jax.convert.qformer", "a Blip2QFormerModel directory or a STAR/LAVIS checkpoint"),
    "vae": ("star_jax.convert.vae", "a diffusers AutoencoderOobleck directory or a stable-audio/EzAudio VAE"),
    "dit": ("star_jax.convert.dit", "an EzAudio or STAR DiT checkpoint"),
    "cnn14": ("star_jax.convert.cnn14", "a PANNs CNN14 checkpoint (Cnn14_16k_mAP=0.438.pth), for FD/KL/IS"),
    "vggish": ("star_jax.convert.vggish", "a torchvggish checkpoint (vggish-10086976.pth), for FAD"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
  sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
  for kind, (module_name, help_text) in CONVERTERS.items():
    if not module_exists(module_name):
      continue
    module = importlib.import_module(module_name)
    if not hasattr(module, "add_cli_arguments"):
      continue
    q = sub.add_parser(kind, help=help_text, description=help_text)
    q.add_argument("--from", dest="source", required=True, help="source checkpoint (file or directory)")
    q.add_argument("--out", required=True, help="output directory for the orbax checkpoint")
    module.add_cli_arguments(q)
    q.set_defaults(_converter=module)


def run(args: argparse.Namespace) -> int:
  from star_jax.checkpoint import save_params

  config, params = args._converter.convert_cli(args)
  out = save_params(args.out, params, config, kind=args.kind)
  print(f"star-jax convert {args.kind}: wrote {out}")
  return 0
