"""The converter's output file: one `.npz` of arrays plus a JSON `__meta__` entry.

Arrays are stored under `/`-joined paths (`backbone/params/conv1/kernel`); `__meta__`
holds the format version, arch, source path and sha256, and the mapping report. Written
atomically (a temporary file in the destination folder, fsync, rename), so a failed or
interrupted conversion never leaves a partial file behind. Read with
`allow_pickle=False`.
"""

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from bitune_jax import files

FORMAT_VERSION = 1
_META = "__meta__"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def save_converted(result: Mapping[str, Any], dst: str | os.PathLike, *,
                   source: str | os.PathLike | None = None,
                   source_sha256: str | None = None) -> str | os.PathLike:
  """Writes `result` (of `convert_checkpoint`) to `dst` atomically. Returns `dst`."""
  arrays = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
      {k: v for k, v in result.items() if k != "report"}).items()}
  meta = {"format_version": FORMAT_VERSION, "arch": result["report"]["arch"],
          "source": None if source is None else os.path.abspath(source),
          "source_sha256": source_sha256, "report": result["report"]}
  arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.write_atomically(dst, buffer.getvalue())
  return dst


def load_converted(path: str | os.PathLike) -> dict[str, Any]:
  """Reads what `save_converted` wrote: the same structure as `convert_checkpoint`'s
  result, with `report` extended by `source` and `source_sha256`. A missing, truncated
  or foreign file is a ValueError that says which and what to do."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file (give a bitune-convert output .npz)")
  try:
    with np.load(path, allow_pickle=False) as data:
      if _META not in data.files:
        raise ValueError(f"{path} is not a bitune-convert output (no {_META} entry); "
                         "convert the checkpoint with bitune-convert first")
      meta = json.loads(bytes(data[_META]).decode())
      if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version "
                         f"{meta.get('format_version')}")
      flat = {tuple(k.split("/")): data[k] for k in data.files if k != _META}
  except ValueError as e:
    if str(e).startswith(str(path)):
      raise
    raise ValueError(f"{path} is not a bitune-convert output (not a readable .npz: "
                     "truncated, or another format); convert the checkpoint with "
                     "bitune-convert first") from None
  except (OSError, EOFError, zipfile.BadZipFile, KeyError):
    raise ValueError(f"{path} is not a bitune-convert output (truncated or corrupt "
                     ".npz); convert the checkpoint again with bitune-convert") from None
  result = traverse_util.unflatten_dict(flat)
  result["backbone"].setdefault("batch_stats", {})  # a ViT's: empty, so not in the file
  result["report"] = dict(meta["report"], source=meta["source"],
                          source_sha256=meta["source_sha256"])
  return result
