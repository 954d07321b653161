"""Reads PyTorch checkpoints without PyTorch and without running any pickled code.

    obj, fmt = read_checkpoint("moco_v2_800ep.pth.tar")   # fmt: "torch_legacy"

Formats: the torch zip format (`torch.save` since 1.6), the torch legacy stream
(`_use_new_zipfile_serialization=False`, torch < 1.6), TorchScript archives
(`torch.jit.save`, e.g. OpenAI's CLIP release: their tensors only, as a state dict; the
archive's code is not run), safetensors and npz. Tensors come
back as C-contiguous, writable numpy arrays (views applied, nn.Parameter -> array),
OrderedDict and argparse.Namespace as plain dicts, torch.Size as tuples, torch.device as
strings. bfloat16 (and float8) tensors are `ml_dtypes` arrays (exact; ml_dtypes is a JAX
dependency). Bool data is read as bytes and compared with zero. Only little-endian
files are read; OrderedDict attributes (`state_dict()._metadata`) are dropped. An
object of a class the reader does not know (e.g. InsDisc's pickled memory bank module)
comes back as a `ForeignObject` (its qualified name and pickled state as plain data);
the class is never imported and nothing of it runs.

The pickles are read by `safe_pickle` (an allow-list unpickler that executes nothing).
"""

import io
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from bitune_jax.convert import dtypes
from bitune_jax.convert.safe_pickle import (CheckpointError, ForeignObject,
                                            UnsafeCheckpointError, int_tuple,
                                            load_pickle, to_plain)

__all__ = ["CheckpointError", "ForeignObject", "UnsafeCheckpointError", "read_checkpoint"]

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


# ------------------------------------------------------------------------------ formats
def _read_torch_zip(path, zf, root):
  """torch zip format: `<root>/data.pkl` + `<root>/data/<key>` raw little-endian bytes."""
  names = set(zf.namelist())
  order = "little"
  if f"{root}/byteorder" in names:
    order = zf.read(f"{root}/byteorder").decode("ascii", "replace").strip()
  if order != "little":
    raise CheckpointError(f"byteorder is '{order}': only little-endian checkpoints are read")
  obj = load_pickle(io.BytesIO(zf.read(f"{root}/data.pkl")), path)
  cache = {}

  def fetch(key):
    if key not in cache:
      name = f"{root}/data/{key}"
      if name not in names:
        raise CheckpointError(f"storage key '{key}' missing: no '{name}' in the zip")
      cache[key] = zf.read(name)
    return cache[key]

  return to_plain(obj, fetch)


def _read_legacy(path, raw):
  """torch legacy stream: magic, protocol, sys_info, object, storage keys, storages.

  `raw` is the whole file (bytes): pickle reads are then bounded by what is there, and
  storages are zero-copy slices of it.
  """
  f = io.BytesIO(raw)
  if load_pickle(f, path) != _LEGACY_MAGIC:
    raise CheckpointError("not a torch checkpoint: bad legacy magic number")
  protocol = load_pickle(f, path)
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"unsupported legacy protocol version {protocol!r:.50}")
  sys_info = load_pickle(f, path)
  if isinstance(sys_info, dict) and sys_info.get("little_endian", True) is not True:
    raise CheckpointError("big-endian legacy checkpoint: only little-endian is read")
  storages = {}
  obj = load_pickle(f, path, storages, legacy=True)
  keys = load_pickle(f, path)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"bad legacy storage key list {keys!r:.200}")
  data, pos = {}, f.tell()
  for key in keys:  # Each: int64 little-endian element count, then the raw bytes.
    if key not in storages:
      raise CheckpointError(f"storage key '{key}' is listed but no tensor uses it")
    head = raw[pos:pos + 8]
    if len(head) < 8:
      raise CheckpointError(f"truncated: storage '{key}' needs 8 bytes, {len(head)} "
                            "available (for its length record)")
    nbytes = int.from_bytes(head, "little", signed=True) * storages[key][0].itemsize
    pos += 8
    if not 0 <= nbytes <= len(raw) - pos:
      raise CheckpointError(f"truncated: storage '{key}' needs {nbytes} bytes, "
                            f"{len(raw) - pos} available")
    data[key] = memoryview(raw)[pos:pos + nbytes]
    pos += nbytes

  def fetch(key):
    if key not in data:
      raise CheckpointError(f"storage key '{key}' missing from the legacy stream")
    return data[key]

  return to_plain(obj, fetch)


def _safetensors_array(name, info, data):
  """One safetensors entry {dtype, shape, data_offsets} -> a numpy array."""
  if not (isinstance(info, dict) and info.get("dtype") in dtypes.SAFETENSORS):
    raise CheckpointError(f"tensor '{name}': unsupported entry {info!r:.200}")
  dtype = dtypes.DTYPES[dtypes.SAFETENSORS[info["dtype"]]]
  shape = int_tuple(info.get("shape"), f"tensor '{name}' shape")
  offsets = int_tuple(info.get("data_offsets"), f"tensor '{name}' data_offsets")
  count = math.prod(shape)
  if len(offsets) != 2 or min(shape, default=0) < 0 or not (
      0 <= offsets[0] and offsets[1] - offsets[0] == count * dtype.itemsize):
    raise CheckpointError(f"tensor '{name}': shape {shape} does not match "
                          f"data_offsets {offsets} for {info['dtype']}")
  if offsets[1] > len(data):
    raise CheckpointError(f"truncated: tensor '{name}' needs {offsets[1]} bytes of data, "
                          f"{len(data)} available")
  flat = np.frombuffer(data, dtype=np.uint8 if dtype.kind == "b" else dtype, count=count,
                       offset=offsets[0])
  array = flat.reshape(shape).copy()
  return array != 0 if dtype.kind == "b" else array


def _read_safetensors(f, size):
  """safetensors: u64 LE header length, JSON header, raw little-endian data."""
  length = int.from_bytes(f.read(8), "little")
  header = json.loads(f.read(length).decode("utf-8"))
  if not isinstance(header, dict):
    raise CheckpointError("safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None)  # Free-form str -> str; not a tensor.
  if metadata is not None and not (isinstance(metadata, dict) and all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
    raise CheckpointError("safetensors __metadata__ must map strings to strings")
  data = f.read(size - 8 - length)
  return {name: _safetensors_array(name, info, data) for name, info in header.items()}


def _read_zip(path):
  """A zip is a torch checkpoint if it has one `<root>/data.pkl`, npz if all `.npy`."""
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise CheckpointError(f"truncated or corrupt zip archive ({e})") from e
  with zf:
    names = zf.namelist()
    roots = [n[:-len("/data.pkl")] for n in names
             if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) == 1:
      obj = _read_torch_zip(path, zf, roots[0])
      if f"{roots[0]}/constants.pkl" in names and isinstance(obj, ForeignObject):
        return torchscript_state_dict(obj), "torchscript"
      return obj, "torch_zip"
    if len(roots) > 1:
      raise CheckpointError(f"zip holds {len(roots)} data.pkl files: {roots[:5]}")
  if names and all(n.endswith(".npy") for n in names):
    with np.load(path, allow_pickle=False) as npz:
      return {k: np.asarray(npz[k], order="C") for k in npz.files}, "npz"
  raise CheckpointError("zip archive is neither a torch checkpoint (no <root>/data.pkl) "
                        "nor an npz file")


def torchscript_state_dict(module: ForeignObject) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive's module tree (`torch.jit.save`), named as its
  `state_dict()` would name them (`visual.conv1.weight`). The archive's code is never
  read or run: its modules are `ForeignObject`s whose state holds their attributes."""
  tensors = {}

  def walk(obj, prefix):
    for key, value in obj.state.items() if isinstance(obj.state, dict) else ():
      if isinstance(value, np.ndarray):
        tensors[prefix + str(key)] = value
      elif isinstance(value, ForeignObject):
        walk(value, f"{prefix}{key}.")
  walk(module, "")
  if not tensors:
    raise CheckpointError(f"TorchScript archive of {module.qualname} holds no tensors")
  return tensors


def _sniff(head, size):
  """'zip', 'safetensors' or 'torch_legacy' from the first bytes, else CheckpointError."""
  if head[:2] == b"PK":
    return "zip"
  if head[257:262] == b"ustar":
    raise CheckpointError("unsupported tar-format checkpoint (torch < 0.1.10 layout); "
                          "re-save it with torch.save")
  if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
    return "safetensors"
  if head[:1] == b"\x80":
    return "torch_legacy"
  raise CheckpointError(f"unknown checkpoint format (first bytes {head[:16]!r}): not a "
                        "torch zip or legacy file, safetensors or npz")


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, str]:
  """Reads a checkpoint without executing pickled code and without PyTorch.

  Args:
    path: a torch checkpoint (zip or legacy format), `.safetensors` or `.npz` file.

  Returns:
    `(obj, format)`, format one of 'torch_zip', 'torch_legacy', 'torchscript',
    'safetensors', 'npz'.
    For torch files obj is the saved object tree (arrays, dicts, lists, tuples, sets,
    str, bytes, int, float, complex, bool, None, and `ForeignObject` for objects of
    classes off the allow-list outside the standard library); TorchScript archives,
    safetensors and npz give a flat dict name -> array (safetensors `__metadata__` is validated, not returned).

  Raises:
    UnsafeCheckpointError: the file names a standard-library global or an opcode off
      the allow-list, or asks to call a global off it.
    CheckpointError: missing, empty, truncated, corrupt or unknown file.
  """
  path = os.fspath(path)
  try:
    if not os.path.isfile(path):
      raise CheckpointError(f"no such checkpoint file: {path}")
    size = os.path.getsize(path)
    if size == 0:
      raise CheckpointError(f"empty file: {path}")
    with open(path, "rb") as f:
      kind = _sniff(f.read(512), size)
      f.seek(0)
      if kind == "safetensors":
        return _read_safetensors(f, size), kind
      if kind == "torch_legacy":
        return _read_legacy(path, f.read()), kind
    return _read_zip(path)
  except CheckpointError as e:
    if path not in str(e):
      e.args = (f"{path}: {e}",)
    raise
  except Exception as e:  # Whatever a corrupt file breaks surfaces as CheckpointError.
    raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from e
