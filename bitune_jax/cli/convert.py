"""`bitune-convert SRC DST --arch ARCH`: convert a PyTorch checkpoint for bitune_jax."""

import argparse
import os
import sys
import time
from collections.abc import Sequence

from bitune_jax import models
from bitune_jax.cli import console


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
  console.add_version(parser)
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


def _sentence(text):
  text = text.strip()
  return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _dropped(items):
  """'epoch (checkpoint metadata)', 'arch (checkpoint metadata)' -> one clause each
  reason: 'epoch and arch (checkpoint metadata)'."""
  groups = {}
  for item in items:
    name, _, why = item.partition(" (")
    groups.setdefault(why, []).append(name)
  clauses = []
  for why, names in groups.items():
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    clauses.append(f"{listed} ({why}" if why else listed)
  return "; ".join(clauses)


def report_text(src: str, dst: str, digest: str, result: dict, seconds: float) -> str:
  """What a conversion did, in sentences, each thing once."""
  report = result["report"]
  lines = [f"Converted {src} ({report['format']} file, sha256 {digest[:12]}...) to {dst} "
           f"in {seconds:.2f} s.",
           f"Backbone: {report['arch']} from a {report['kind']} checkpoint, "
           f"{report['backbone_parameters']:,} parameters."]
  notes = list(report["notes"])
  if "source_head" in result and not any(n.startswith("source head") for n in notes):
    notes.insert(0, f"source head: {result['source_head']['kernel'].shape[1]} classes")
  if "projector" in result:
    config = ", ".join(f"{k}={v}" for k, v in report["projector_config"].items())
    said = [i for i, n in enumerate(notes) if n.startswith("projector from")]
    if said:
      notes[said[0]] += f": models.Projector({config})"
    else:
      notes.insert(0, f"projector: models.Projector({config})")
  for note in notes:
    if " num_batches_tracked buffers" in note:  # counters Flax's BatchNorm has no use for
      note = f"left out {note}"
    lines.append(_sentence(note))
  if report["dropped"]:
    lines.append(_sentence(f"dropped {_dropped(report['dropped'])}"))
  return "\n".join(lines)


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
  print(report_text(args.src, args.dst, digest, result, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
