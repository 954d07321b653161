"""The allow-list unpickler behind `reader.read_checkpoint`: torch pickles as data.

Safety, in four layers:
  1. Each pickle is first walked with `pickletools.genops`, a parser that executes
     nothing: EXT1/EXT2/EXT4 (copyreg extension codes) are refused, and so is any
     GLOBAL/INST naming a global of Python's standard library (`os.system`,
     `builtins.eval`, `subprocess.Popen`, `copyreg._reconstructor`, `functools.partial`,
     ...) that is not on the allow-list.
  2. `_SafeUnpickler.find_class` never imports anything. It maps each allowed (module,
     name) to this module's own replacement and refuses the standard library's other
     globals (STACK_GLOBAL included). Any other global (a training repository's class
     such as InsDisc's `lib.LinearAverage.LinearAverage`, or any third-party function)
     becomes an inert stand-in class that refuses to be called (REDUCE; INST/OBJ with
     arguments). REDUCE can therefore only call our replacements or the data-only
     builtins set, frozenset and complex.
  3. NEWOBJ on a stand-in (how protocol 2 pickles an object: `cls.__new__(cls, *args)`,
     then BUILD with its `__dict__`) makes a slotted record of the arguments and state,
     which to_plain turns into a `ForeignObject` of plain data. No method of the real
     class, nor any function named in the file, ever runs.
  4. Allowed functions are wrapped, and the replacements return inert placeholders
     (`__slots__`, a `__setstate__` that refuses BUILD), so BUILD can patch nothing;
     arrays are made only after unpickling, with bounds checked against the storage's
     bytes before `as_strided` looks at them.
"""

import dataclasses
import io
import pickle
import pickletools
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from bitune_jax.convert import dtypes

class CheckpointError(ValueError):
  """The file is missing, truncated, corrupt or in no format this reader knows."""


class UnsafeCheckpointError(CheckpointError):
  """The file asks for a global or opcode that is not on the allow-list."""


@dataclasses.dataclass(frozen=True, eq=False)
class ForeignObject:
  """An object of a class off the allow-list, read as data (the class never imported):
  `qualname` as pickled (e.g. 'lib.LinearAverage.LinearAverage'), the `args` of its
  `__new__`, its BUILD `state` (an nn.Module's `__dict__`: `_buffers`, ... as dicts of
  arrays; None without BUILD). `reference`: a bare reference to the class or function."""
  qualname: str
  args: tuple = ()
  state: Any = None
  reference: bool = False


# ----------------------------------------------------------------------- placeholders
class _Inert:
  """Base of the unpickler's placeholders: slotted, and BUILD on them is refused."""
  __slots__ = ()

  def __init__(self, *values):
    for slot, value in zip(self.__slots__, values):
      object.__setattr__(self, slot, value)

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"refusing BUILD (__setstate__) on a "
                                f"{type(self).__name__[1:]} placeholder; nothing was executed")


class _Callable(_Inert):
  """An allowed callable: REDUCE calls it; BUILD cannot reach the function inside."""
  __slots__ = ("fn",)

  def __call__(self, *args):
    return self.fn(*args)


class _Dtype(_Inert):
  """A `torch.<dtype>` global, e.g. the dtype argument of `_rebuild_tensor_v3`."""
  __slots__ = ("dtype",)


class _StorageType(_Inert):
  """A storage class global (`torch.FloatStorage`, `torch.UntypedStorage`, ...)."""
  __slots__ = ("dtype",)


class _Storage(_Inert):
  """A storage from a persistent id: `nbytes` bytes of storage `key` from byte `start`."""
  __slots__ = ("key", "dtype", "start", "nbytes")


class _Tensor(_Inert):
  """A tensor to be cut out of `storage` once the storages' bytes are known."""
  __slots__ = ("storage", "dtype", "offset", "size", "stride")


class _ODict(dict):
  """Stands in for collections.OrderedDict; instance attributes (BUILD state) dropped."""
  __slots__ = ()

  def __setstate__(self, state):
    del state  # e.g. state_dict()._metadata: module versions, not tensors.


class _Namespace(dict):
  """Stands in for argparse.Namespace: its attributes, as a dict (data only)."""
  __slots__ = ()

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise CheckpointError(f"argparse.Namespace state must be a dict, got {type(state)}")
    self.update(state)


class _ForeignClass(type):
  """Metaclass of the stand-ins for globals off the allow-list. Calling one (REDUCE,
  INST/OBJ with arguments) is refused: the real global might be any function."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"refusing to call '{cls.qualname}' in checkpoint {cls.path}: globals off the "
        "allow-list are read as inert class references and never called; nothing was "
        "executed")


_UNSET = object()


class _ForeignInstance:
  """What NEWOBJ makes of a stand-in class: a record of its arguments and BUILD state."""
  __slots__ = ("args", "state")

  def __new__(cls, *args):
    self = object.__new__(cls)
    self.args, self.state = args, _UNSET
    return self

  def __setstate__(self, *state):
    # BUILD on the stand-in class itself would call this with the state as `self`.
    if not isinstance(self, _ForeignInstance) or len(state) != 1 or self.state is not _UNSET:
      raise UnsafeCheckpointError("refusing BUILD on a stand-in class (or a second BUILD "
                                  "on one object); nothing was executed")
    self.state = state[0]


# ----------------------------------------------------------------------- replacements
def int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or any(type(v) is not int for v in value):
    raise CheckpointError(f"{what} must be a tuple of ints, got {value!r:.200}")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None):
  """Replacement for torch._utils._rebuild_tensor: validates and returns a _Tensor."""
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor built from a {type(storage).__name__}, not a storage")
  if dtype is not None and not isinstance(dtype, _Dtype):
    raise CheckpointError(f"tensor dtype must be a torch dtype, got {dtype!r:.200}")
  size, stride = int_tuple(size, "tensor size"), int_tuple(stride, "tensor stride")
  if type(storage_offset) is not int or len(size) != len(stride) or min(size, default=0) < 0:
    raise CheckpointError(f"bad tensor geometry: offset {storage_offset!r:.50}, "
                          f"size {size}, stride {stride}")
  return _Tensor(storage, storage.dtype if dtype is None else dtype.dtype,
                 storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """Replacement for torch._utils._rebuild_tensor_v2 (hooks and metadata ignored)."""
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  """Replacement for torch._utils._rebuild_tensor_v3 (untyped storage + dtype)."""
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """Replacement for _rebuild_parameter(_with_state): a Parameter is its tensor."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise CheckpointError(f"parameter built from a {type(data).__name__}, not a tensor")
  return data


def _torch_device(kind, index=None):
  if not isinstance(kind, str) or not (index is None or type(index) is int):
    raise CheckpointError(f"bad torch.device arguments {kind!r:.50}, {index!r:.50}")
  return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="latin1"):
  """How protocol-2 pickles spell bytes: `_codecs.encode(str, 'latin1')`, nothing else."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise CheckpointError(f"_codecs.encode allowed only as (str, 'latin1'), got {encoding!r:.50}")
  return text.encode("latin1")


def _allow_list():
  """(module, name) -> our replacement; functions wrapped so BUILD cannot patch them."""
  rebuild = {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor_v2,
             "_rebuild_tensor_v3": _rebuild_tensor_v3,
             "_rebuild_parameter": _rebuild_parameter,
             "_rebuild_parameter_with_state": _rebuild_parameter}
  allowed = {("torch._utils", name): fn for name, fn in rebuild.items()}
  allowed.update({
      ("collections", "OrderedDict"): _ODict, ("argparse", "Namespace"): _Namespace,
      ("torch", "Size"): lambda dims=(): int_tuple(dims, "torch.Size"),
      ("torch", "device"): _torch_device,
      ("_codecs", "encode"): _codecs_encode,
      ("torch", "UntypedStorage"): _StorageType(dtypes.DTYPES["uint8"]),
      ("torch.storage", "UntypedStorage"): _StorageType(dtypes.DTYPES["uint8"])})
  for module in ("builtins", "__builtin__"):  # protocol 2 spells builtins __builtin__
    allowed.update({(module, "set"): set, (module, "frozenset"): frozenset,
                    (module, "complex"): complex})
  for name, dtype in dtypes.STORAGES.items():
    allowed["torch", name] = _StorageType(dtypes.DTYPES[dtype])
  for name, dtype in dtypes.DTYPES.items():  # torch.float32 etc. pickle as `torch float32`.
    allowed["torch", name] = _Dtype(dtype)
  return {k: _Callable(v) if callable(v) and not isinstance(v, type) else v
          for k, v in allowed.items()}


_ALLOWED = _allow_list()
# Globals of these modules are refused on sight unless allowed above: Python's standard
# library (and its Python 2 names) holds the classic gadgets. Those of any other module
# become inert stand-ins (see the module docstring).
_STDLIB = frozenset(sys.stdlib_module_names) | {"__builtin__", "copy_reg", "exceptions"}


def _refused(module):
  return module.partition(".")[0] in _STDLIB


# --------------------------------------------------------------------------- unpickling
def _refusal(module, name, path):
  return (f"refusing global '{module}.{name}' in checkpoint {path}: "
          "not on the allow-list; nothing was executed")


class _SafeUnpickler(pickle.Unpickler):
  """Globals only from the allow-list; persistent ids become lazy _Storage refs.

  `storages` collects key -> (dtype, nbytes) of every root storage the pickle uses.
  """

  def __init__(self, data, path, storages, legacy):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self._path, self._storages, self._legacy = path, storages, legacy
    self._foreign = {}

  def find_class(self, module, name):
    target = _ALLOWED.get((module, name))
    if target is not None:
      return target
    if _refused(module):
      raise UnsafeCheckpointError(_refusal(module, name, self._path))
    qualname = f"{module}.{name}"
    if qualname not in self._foreign:
      self._foreign[qualname] = _ForeignClass(
          "ForeignClass", (_ForeignInstance,),
          {"__slots__": (), "qualname": qualname, "path": self._path})
    return self._foreign[qualname]

  def persistent_load(self, pid):
    # Legacy torch.save names an nn.Module subclass by ('module', class, file, source).
    if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
      if not isinstance(pid[1], _ForeignClass):
        raise CheckpointError(f"bad module persistent id {pid[:2]!r:.200}")
      return pid[1]
    length = 6 if self._legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ("storage", b"storage")):
      raise CheckpointError(f"unsupported persistent id {pid!r:.200}")
    storage_type, key, _, numel = pid[1:5]
    if not (isinstance(storage_type, _StorageType) and isinstance(key, str)
            and type(numel) is int and numel >= 0):
      raise CheckpointError(f"bad storage persistent id {pid!r:.200}")
    dtype = storage_type.dtype
    self._storages.setdefault(key, (dtype, numel * dtype.itemsize))
    view = pid[5] if self._legacy else None
    if view is None:
      return _Storage(key, dtype, 0, numel * dtype.itemsize)
    if not (isinstance(view, tuple) and len(view) == 3
            and all(type(v) is int and v >= 0 for v in view[1:])):
      raise CheckpointError(f"bad storage view metadata {view!r:.200}")
    _, offset, view_size = view  # A view of the root storage, in elements.
    return _Storage(key, dtype, offset * dtype.itemsize, view_size * dtype.itemsize)


def _check_opcode(name, arg, path, count):
  """Refuses opcode `count` of a pickle before anything runs, if it is unsafe."""
  if name in ("EXT1", "EXT2", "EXT4"):
    raise UnsafeCheckpointError(
        f"refusing opcode {name} (copyreg extension code {arg}) in checkpoint {path}: "
        "extension registry lookups are not on the allow-list; nothing was executed")
  if name in ("GLOBAL", "INST"):
    module, _, attr = arg.partition(" ")
    if (module, attr) not in _ALLOWED and _refused(module):
      raise UnsafeCheckpointError(_refusal(module, attr, path))
  if name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:  # Picklers count up; a
    raise CheckpointError(f"corrupt pickle: memo index {arg}")  # huge one allocates GBs.


def load_pickle(f: BinaryIO, path: str,
                storages: dict[str, tuple[np.dtype, int]] | None = None,
                legacy: bool = False) -> Any:
  """Checks the opcodes of the next pickle in `f`, then unpickles it safely."""
  start = f.tell()
  try:
    for count, (opcode, arg, _) in enumerate(pickletools.genops(f)):
      _check_opcode(opcode.name, arg, path, count)
  except CheckpointError:
    raise
  except Exception as e:  # genops: ValueError on a cut or garbled stream.
    raise CheckpointError(f"truncated or corrupt pickle at byte {start}: {e}") from e
  end = f.tell()
  f.seek(start)
  data = f.read(end - start)
  unpickler = _SafeUnpickler(data, path, {} if storages is None else storages, legacy)
  return unpickler.load()


# ------------------------------------------------------------------------ materialising
def _flat(storage, dtype, fetch):
  """The storage's bytes as a read-only 1-d array of `dtype` (bool read as uint8)."""
  raw = fetch(storage.key)
  end = storage.start + storage.nbytes
  if end > len(raw):
    raise CheckpointError(
        f"truncated: storage '{storage.key}' needs {end} bytes, {len(raw)} available")
  return np.frombuffer(raw, dtype=np.uint8 if dtype.kind == "b" else dtype,
                       count=storage.nbytes // dtype.itemsize, offset=storage.start)


def _tensor_array(t, fetch):
  """Copies tensor `t` (offset, size, stride in elements) out of its storage."""
  flat = _flat(t.storage, t.dtype, fetch)
  if 0 in t.size:
    array = np.zeros(t.size, flat.dtype)
  else:
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or min(t.stride, default=0) < 0 or last >= flat.size:
      raise CheckpointError(
          f"tensor (offset {t.offset}, size {t.size}, stride {t.stride}) lies outside "
          f"storage '{t.storage.key}' of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=[s * flat.itemsize for s in t.stride])
    array = np.array(view, order="C")  # A copy: C-contiguous, writable.
  return array != 0 if t.dtype.kind == "b" else array


def to_plain(root: Any, fetch: Callable[[str], bytes | memoryview]) -> Any:
  """Placeholders -> arrays, dict subclasses -> dict; keeps sharing, rejects strangers."""
  memo, busy = {}, object()
  scalars = (str, bytes, bytearray, int, float, complex, bool, type(None))

  def convert(x):
    if type(x) in scalars:
      return x
    if id(x) in memo:
      if memo[id(x)] is busy:
        raise CheckpointError("self-referencing tuple, set or object")
      return memo[id(x)]
    if isinstance(x, dict):
      out = memo[id(x)] = {}
      for key, value in x.items():
        out[convert(key)] = convert(value)
    elif type(x) is list:
      out = memo[id(x)] = []
      out.extend(convert(v) for v in x)
    elif type(x) in (tuple, set, frozenset):
      memo[id(x)] = busy
      out = type(x)(convert(v) for v in x)
    elif isinstance(x, _Tensor):
      out = _tensor_array(x, fetch)
    elif isinstance(x, _Storage):
      out = _tensor_array(_Tensor(x, x.dtype, 0, (x.nbytes // x.dtype.itemsize,), (1,)), fetch)
    elif isinstance(x, (_Dtype, _StorageType)):
      out = x.dtype
    elif isinstance(x, _ForeignInstance):
      memo[id(x)] = busy
      state = None if x.state is _UNSET else convert(x.state)
      out = ForeignObject(type(x).qualname, convert(x.args), state)
    elif isinstance(x, _ForeignClass):
      out = ForeignObject(x.qualname, reference=True)
    else:
      raise CheckpointError(f"unexpected object of type {type(x).__name__} in the pickle")
    memo[id(x)] = out
    return out

  return convert(root)

