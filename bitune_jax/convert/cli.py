"""`bitune-convert SRC DST --arch ARCH`: convert a PyTorch checkpoint for bitune_jax."""

import argparse
import os
import sys
import time
from collections.abc import Sequence

from bitune_jax import console, models


def _parser():
  parser = argparse.ArgumentParser(
      prog="bitune-convert",
      description="Convert a torchvision ResNet/DenseNet checkpoint, or a MoCo v1/v2/v3, "
                  "SwAV, DeepCluster-v2 or InsDisc one (detected from its key layout), "
                  "(.pth/.pth.tar in zip or legacy format, .safetensors, .npz) into a "
                  "bitune_jax .npz. Never executes pickled code.")
  parser.add_argument("src", help="the PyTorch checkpoint")
  parser.add_argument("dst", help="the output file (.npz), written atomically")
  parser.add_argument("--arch", required=True, choices=models.ARCHS)
  parser.add_argument("--allow-unused", action="store_true",
                      help="tolerate (and report) tensors the architecture has no place for")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing DST (never the source checkpoint itself)")
  parser.add_argument("--version", action="version",
                      version=f"bitune-convert {console.version()}")
  return parser


def _check_destination(src, dst, overwrite):
  """The error message when `dst` must not be written, else None."""
  if os.path.realpath(src) == os.path.realpath(dst) or (
      os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst)):
    return f"{dst} is the source checkpoint: refusing to write over it"
  if os.path.isdir(dst):
    return f"{dst} is a directory; give the output file's path (e.g. {dst}/model.npz)"
  if os.path.exists(dst) and not overwrite:
    return f"{dst} exists; pass --overwrite to replace it"
  return None


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  refusal = _check_destination(args.src, args.dst, args.overwrite)
  if refusal:
    print(f"bitune-convert: error: {refusal}", file=sys.stderr)
    return 2
  # Imported here so that `--help` and argument errors stay instant.
  from bitune_jax import convert  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    digest = convert.sha256_of(args.src)
    result = convert.convert_checkpoint(args.src, arch=args.arch,
                                        allow_unused=args.allow_unused)
    convert.save_converted(result, args.dst, source=args.src, source_sha256=digest)
  except (OSError, ValueError) as e:  # CheckpointError, ConversionError are ValueErrors
    print(f"bitune-convert: error: {e}", file=sys.stderr)
    return 2
  report = result["report"]
  print(f"converted {args.src} ({report['format']}, sha256 {digest[:12]}...) -> {args.dst}")
  print(f"  arch {report['arch']}, {report['kind']}, "
        f"{report['backbone_parameters']:,} backbone parameters")
  if "source_head" in result:
    print(f"  source head: {result['source_head']['kernel'].shape[1]} classes")
  if "projector" in result:
    config = ", ".join(f"{k}={v}" for k, v in report["projector_config"].items())
    print(f"  projector: models.Projector({config})")
  for line in report["notes"] + [f"dropped: {d}" for d in report["dropped"]]:
    print(f"  {line}")
  print(f"  done in {time.perf_counter() - start:.2f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
