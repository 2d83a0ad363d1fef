"""Score generated audio against reference audio as STAR's Table 2 does: FAD, FD, KL, IS, CLAP.

  star-jax evaluate --generated outputs/gen --reference audiocaps/test \\
      --cnn14-ckpt Cnn14_16k_mAP=0.438.pth --vggish-ckpt vggish-10086976.pth \\
      --clap-dir clap-htsat-unfused --captions captions.csv

FAD uses VGGish; FD, KL and IS use PANNs CNN14 (16 kHz); CLAP uses a local transformers ClapModel
directory and a CSV with `file` and `caption` columns. Checkpoints are the public PyTorch files (or
folders written by `star-jax convert cnn14|vggish`). A metric whose checkpoint is not given is reported
as not computed, with the reason. KL needs generated and reference clips with the same file names.
Prints a markdown table and writes it as JSON (--out, default GENERATED/metrics.json).
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--generated", required=True, help="folder of generated clips (wav/flac/ogg)")
  p.add_argument("--reference", required=True, help="folder of reference clips; same file names for KL")
  p.add_argument("--captions", help="CSV with 'file' (or 'id') and 'caption' columns, for CLAP")
  p.add_argument("--cnn14-ckpt", help="PANNs CNN14 16 kHz checkpoint (Cnn14_16k_mAP=0.438.pth): FD, KL, IS")
  p.add_argument("--vggish-ckpt", help="torchvggish checkpoint (vggish-10086976.pth): FAD")
  p.add_argument("--clap-dir", help="local transformers ClapModel + ClapProcessor directory: CLAP")
  p.add_argument("--name", help="row label in the table (default: the generated folder's name)")
  p.add_argument("--out", help="JSON output path (default: GENERATED/metrics.json)")


def run(args: argparse.Namespace) -> int:
  from star_jax.metrics.evaluate import evaluate, format_table, read_captions

  missing, cnn14, vggish, clap = {}, None, None, None
  if args.cnn14_ckpt:
    from star_jax.convert import cnn14 as convert_cnn14
    from star_jax.metrics.cnn14 import Cnn14Embedder
    config, params = convert_cnn14.load(args.cnn14_ckpt)
    cnn14 = Cnn14Embedder(params, config)
  else:
    missing.update({m: "no --cnn14-ckpt given" for m in ("FD", "KL", "IS")})
  if args.vggish_ckpt:
    from star_jax.convert import vggish as convert_vggish
    from star_jax.metrics.vggish import VggishEmbedder
    config, params = convert_vggish.load(args.vggish_ckpt)
    vggish = VggishEmbedder(params, config)
  else:
    missing["FAD"] = "no --vggish-ckpt given"
  if args.clap_dir:
    from star_jax.metrics.clap import ClapScorer
    clap = ClapScorer(args.clap_dir)
  else:
    missing["CLAP"] = "no --clap-dir given"
  captions = read_captions(args.captions) if args.captions else None

  report = evaluate(args.generated, args.reference, cnn14=cnn14, vggish=vggish, clap=clap,
                    captions=captions, system=args.name, missing=missing)
  print(format_table([report]))
  out = args.out or os.path.join(args.generated, "metrics.json")
  with open(out, "w") as f:
    json.dump(report.to_json(), f, indent=2)
  print(f"wrote {out}")
  return 0
