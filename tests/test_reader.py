"""Safe checkpoint reader: round trips, refused malicious pickles, broken files.

torch is used only here, to write files; the reader itself never imports it.
"""

import argparse
import collections
import copyreg
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from bitune_jax.convert import reader
from bitune_jax.convert.reader import CheckpointError, UnsafeCheckpointError
from bitune_jax.convert.reader import read_checkpoint

_TRUNCATED = r"truncated: storage '\w+' needs \d+ bytes, \d+ available"


# ---------------------------------------------------------------------------- helpers
def _checkpoint():
  """A realistic training checkpoint (torchvision / MoCo style)."""
  gen = torch.Generator().manual_seed(0)
  w = torch.randn(4, 6, generator=gen)
  state_dict = collections.OrderedDict([
      ("conv.weight", w),
      ("conv.weight_t", w.t()),                      # non-contiguous, shares storage
      ("conv.slice", w[1:3, ::2]),                   # offset + strides, shares storage
      ("bn.num_batches_tracked", torch.tensor(7)),   # 0-d int64
      ("bn.momentum", torch.tensor(0.25)),           # 0-d float32
      ("fc.half", torch.randn(5, generator=gen).half()),
      ("fc.bf16", torch.randn(3, generator=gen).bfloat16()),
      ("ids", torch.arange(10, dtype=torch.int64)),
      ("mask", torch.tensor([True, False, True])),
      ("expanded", torch.ones(1, 3).expand(2, 3)),   # stride 0
      ("empty", torch.zeros(0, 3)),
      ("param", torch.nn.Parameter(torch.randn(3, generator=gen))),
  ])
  model = torch.nn.Linear(3, 2)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  model(torch.ones(1, 3)).sum().backward()
  opt.step()
  return {"state_dict": state_dict, "epoch": 3, "arch": "resnet50",
          "args": argparse.Namespace(lr=0.1, arch="r50"),
          "optimizer": opt.state_dict(),
          "head": model.state_dict(),   # an OrderedDict with a `_metadata` attribute
          "size": torch.Size([2, 3]), "tags": ("a", 1, None, True, 2.5),
          "blob": b"\x00\xff", "classes": {1, 2}}


def _assert_same(got, want, where="obj"):
  if isinstance(want, torch.Tensor):
    want = want.detach()
    assert type(got) is np.ndarray, where
    assert got.shape == tuple(want.shape), where
    assert got.flags.c_contiguous and got.flags.writeable, where
    if want.dtype == torch.bfloat16:
      assert got.dtype == ml_dtypes.bfloat16, where
      np.testing.assert_array_equal(got.view(np.int16), want.view(torch.int16).numpy())
    else:
      assert got.dtype == want.numpy().dtype, where
      np.testing.assert_array_equal(got, want.numpy(), err_msg=where)
  elif isinstance(want, argparse.Namespace):
    assert type(got) is dict and got == vars(want), where
  elif isinstance(want, dict):
    assert type(got) is dict and list(got) == list(want), where
    for key in want:
      _assert_same(got[key], want[key], f"{where}[{key!r}]")
  elif isinstance(want, (list, tuple)):
    assert type(got) is (tuple if isinstance(want, torch.Size) else type(want)), where
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_same(g, w, f"{where}[{i}]")
  else:
    assert type(got) is type(want) and got == want, where


class _Call:
  """Pickles as `fn(*args)` (REDUCE), with BUILD `state` if given."""

  def __init__(self, fn, args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class _Pid:
  """Pickles as a persistent id (what torch writes for a storage)."""

  def __init__(self, *pid):
    self.pid = pid


def _dumps(obj, protocol=2):
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=protocol)
  pickler.persistent_id = lambda o: o.pid if isinstance(o, _Pid) else None
  pickler.dump(obj)
  return buf.getvalue()


def _tensor(pid, offset, size, stride, state=None):
  return _Call(torch._utils._rebuild_tensor_v2,
               (_Pid(*pid), offset, size, stride, False, collections.OrderedDict()), state)


def _write_zip(path, entries):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in entries.items():
      zf.writestr(name, data)


def _zip_entries(path):
  with zipfile.ZipFile(path) as zf:
    return {name: zf.read(name) for name in zf.namelist()}


def _legacy_bytes(main_pickle, storages, little_endian=True):
  """A legacy torch stream by hand: storages maps key -> (element count, raw bytes)."""
  sys_info = {"protocol_version": 1001, "little_endian": little_endian,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  parts = [pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2), pickle.dumps(1001, protocol=2),
           pickle.dumps(sys_info, protocol=2), main_pickle,
           pickle.dumps(list(storages), protocol=2)]
  for count, raw in storages.values():
    parts += [count.to_bytes(8, "little"), raw]
  return b"".join(parts)


def _write_safetensors(path, tensors, metadata=None):
  header, blobs, offset = {}, [], 0
  for name, (dtype, array) in tensors.items():
    raw = array.tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  if metadata is not None:
    header["__metadata__"] = metadata
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("protocol", [2, 4])  # 4: globals come as STACK_GLOBAL
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_zip", "torch_legacy"])
def test_torch_checkpoint_round_trip(tmp_path, zip_format, protocol):
  ckpt = _checkpoint()
  path = tmp_path / "ckpt.pth.tar"
  torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
  got, fmt = read_checkpoint(path)
  assert fmt == ("torch_zip" if zip_format else "torch_legacy")
  assert got["classes"] == {1, 2}
  del ckpt["classes"], got["classes"]
  _assert_same(got, ckpt)
  assert got["optimizer"]["state"][0]["momentum_buffer"].dtype == np.float32
  # Views are copied out: writing one leaves the tensor it shared storage with alone.
  got["state_dict"]["conv.weight_t"][0, 0] = 123.0
  assert got["state_dict"]["conv.weight"][0, 0] != 123.0


def test_new_dtypes_untyped_storage_device_and_dtype_globals(tmp_path):
  ckpt = {"u16": torch.tensor([1, 2, 60000]).to(torch.uint16),
          "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
          "device": torch.device("cpu"), "dtype": torch.float16,
          "storage": torch.tensor([1.0, 2.0]).untyped_storage()}
  torch.save(ckpt, tmp_path / "v3.pt")
  got, _ = read_checkpoint(tmp_path / "v3.pt")
  np.testing.assert_array_equal(got["u16"], np.array([1, 2, 60000], np.uint16))
  assert got["f8"].dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(got["f8"].astype(np.float32), [0.5, -2.0])
  assert got["device"] == "cpu" and got["dtype"] == np.float16
  np.testing.assert_array_equal(got["storage"], np.array([1, 2], np.float32).view(np.uint8))


def test_legacy_view_metadata(tmp_path):
  # Persistent ids with (view_key, offset, view_size): a view of elements 2..4 of 'root'.
  view = ("storage", torch.FloatStorage, "root", "cpu", 6, ("view", 2, 3))
  whole = ("storage", torch.FloatStorage, "root", "cpu", 6, None)
  main = _dumps({"view": _tensor(view, 1, (2,), (1,)), "whole": _tensor(whole, 0, (2, 3), (3, 1))})
  raw = np.arange(6, dtype=np.float32).tobytes()
  (tmp_path / "v.pth").write_bytes(_legacy_bytes(main, {"root": (6, raw)}))
  got, fmt = read_checkpoint(tmp_path / "v.pth")
  assert fmt == "torch_legacy"
  np.testing.assert_array_equal(got["view"], [3.0, 4.0])
  np.testing.assert_array_equal(got["whole"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      "f32": ("F32", rng.standard_normal((2, 3)).astype(np.float32)),
      "f16": ("F16", rng.standard_normal(4).astype(np.float16)),
      "bf16": ("BF16", rng.standard_normal(5).astype(ml_dtypes.bfloat16)),
      "f64": ("F64", rng.standard_normal((2, 2))),
      "i64": ("I64", np.arange(-3, 3, dtype=np.int64)),
      "i32": ("I32", np.arange(4, dtype=np.int32).reshape(2, 2)),
      "i16": ("I16", np.array([-7, 7], np.int16)),
      "i8": ("I8", np.array([-128, 127], np.int8)),
      "u8": ("U8", np.array([0, 255], np.uint8)),
      "bool": ("BOOL", np.array([True, False, True])),
      "scalar": ("F32", np.array(1.5, np.float32)),
      "empty": ("F32", np.zeros((0, 4), np.float32)),
  }
  path = tmp_path / "model.safetensors"
  _write_safetensors(path, arrays, metadata={"format": "pt"})
  got, fmt = read_checkpoint(path)
  assert fmt == "safetensors" and list(got) == list(arrays)
  for name, (_, want) in arrays.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    assert got[name].flags.c_contiguous and got[name].flags.writeable, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  _write_safetensors(path, arrays, metadata={"format": ["not", "a", "string"]})
  with pytest.raises(CheckpointError, match="__metadata__"):
    read_checkpoint(path)


def test_npz_round_trip(tmp_path):
  want = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(3, np.int64),
          "c": np.asfortranarray(np.ones((3, 2)))}
  np.savez_compressed(tmp_path / "x.npz", **want)
  got, fmt = read_checkpoint(tmp_path / "x.npz")
  assert fmt == "npz" and sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype and got[name].flags.c_contiguous
    np.testing.assert_array_equal(got[name], want[name])
  np.savez(tmp_path / "obj.npz", o=np.array([{"x": 1}], dtype=object))
  with pytest.raises(CheckpointError, match="obj.npz"):
    read_checkpoint(tmp_path / "obj.npz")


def test_reader_module_does_not_import_torch():
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('r', {reader.__file__!r})\n"
          "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
          "assert 'torch' not in sys.modules, 'the reader imported torch'\n")
  subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------- malicious pickles
def _malicious(marker):
  """name of the refused global -> a pickle (raw bytes) that would create `marker`."""
  cmd = f"touch {marker}"
  py = f"__import__('os').system({cmd!r})"
  return {
      "os.system": f"cos\nsystem\n(V{cmd}\ntR.".encode(),
      "posix.system": pickle.dumps(_Call(os.system, (cmd,)), protocol=2),
      "builtins.eval": f"cbuiltins\neval\n(V{py}\ntR.".encode(),
      "builtins.exec": f"cbuiltins\nexec\n(V{py}\ntR.".encode(),
      "subprocess.Popen": f"csubprocess\nPopen\n((Vtouch\nV{marker}\nltR.".encode(),
      "builtins.getattr": (f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\n"
                           f"tR(V{cmd}\ntR.").encode(),
      # _reconstructor(Popen, Popen, argv) runs Popen.__init__(obj, argv).
      "copyreg._reconstructor": (f"ccopyreg\n_reconstructor\n(csubprocess\nPopen\n"
                                 f"csubprocess\nPopen\n(Vtouch\nV{marker}\nltR.").encode(),
      "functools.partial": f"cfunctools\npartial\n(cos\nsystem\nV{cmd}\ntR)R.".encode(),
      # Protocol 4 names globals with STACK_GLOBAL: only find_class can refuse those.
      "posix.system@4": pickle.dumps(_Call(os.system, (cmd,)), protocol=4),
  }


@pytest.mark.parametrize("name", list(_malicious("m")))
def test_malicious_pickle_refused_in_torch_zip(tmp_path, name):
  marker = tmp_path / "pwned"
  payload = _malicious(marker)[name]
  real = tmp_path / "real.pth"
  torch.save({"w": torch.ones(2)}, real)
  entries = _zip_entries(real)
  entries["real/data.pkl"] = payload  # replace data.pkl inside a real checkpoint
  _write_zip(tmp_path / "evil.pth", entries)
  with pytest.raises(UnsafeCheckpointError, match=f"refusing global '{name.split('@')[0]}'"):
    read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_zip", "torch_legacy"])
def test_reduce_object_inside_valid_checkpoint_refused(tmp_path, zip_format):
  marker = tmp_path / "pwned"
  ckpt = {"state_dict": {"w": torch.ones(3)}, "epoch": 1,
          "hook": _Call(os.system, (f"touch {marker}",))}
  torch.save(ckpt, tmp_path / "evil.pth", _use_new_zipfile_serialization=zip_format)
  with pytest.raises(UnsafeCheckpointError, match=r"refusing global 'posix\.system' in "
                     r"checkpoint .*evil\.pth: not on the allow-list; nothing was executed"):
    read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "posix.system@4", "subprocess.Popen"])
def test_malicious_legacy_main_pickle_refused(tmp_path, name):
  marker = tmp_path / "pwned"
  (tmp_path / "evil.pth").write_bytes(_legacy_bytes(_malicious(marker)[name], {}))
  with pytest.raises(UnsafeCheckpointError, match=f"'{name.split('@')[0]}'"):
    read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


def test_extension_opcodes_refused(tmp_path):
  marker = tmp_path / "pwned"
  copyreg.add_extension("posix", "system", 0x1BAD)  # EXT2 0x1BAD would mean posix.system
  try:
    payload = pickle.dumps(_Call(os.system, (f"touch {marker}",)), protocol=2)
  finally:
    copyreg.remove_extension("posix", "system", 0x1BAD)
  assert b"\x83" in payload  # EXT2
  for data in (payload, b"\x80\x02\x82\x07)R."):  # registered EXT2; unregistered EXT1
    _write_zip(tmp_path / "evil.pth", {"a/data.pkl": data})
    with pytest.raises(UnsafeCheckpointError, match="refusing opcode EXT"):
      read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


def test_build_on_tensor_placeholder_refused(tmp_path):
  pid = ("storage", torch.FloatStorage, "0", "cpu", 2)
  data = _dumps({"w": _tensor(pid, 0, (2,), (1,), state={"__class__": "x"})})
  _write_zip(tmp_path / "b.pth", {"a/data.pkl": data, "a/data/0": b"\0" * 8})
  with pytest.raises(UnsafeCheckpointError, match="BUILD"):
    read_checkpoint(tmp_path / "b.pth")


def test_build_on_allowed_function_refused(tmp_path):
  # BUILD with (None, {'__defaults__': (1,)}) would patch the function for later reads.
  data = b"ctorch._utils\n_rebuild_tensor_v2\nN}V__defaults__\n(K\x01ts\x86b."
  _write_zip(tmp_path / "b.pth", {"a/data.pkl": data})
  with pytest.raises(UnsafeCheckpointError, match="BUILD"):
    read_checkpoint(tmp_path / "b.pth")
  _write_zip(tmp_path / "ok.pth", {"a/data.pkl": _dumps({"w": _tensor(
      ("storage", torch.FloatStorage, "0", "cpu", 2), 0, (2,), (1,))}), "a/data/0": b"\0" * 8})
  np.testing.assert_array_equal(read_checkpoint(tmp_path / "ok.pth")[0]["w"], [0.0, 0.0])


def test_tensor_outside_its_storage_refused(tmp_path):
  pid = ("storage", torch.FloatStorage, "0", "cpu", 4)
  for offset, size, stride in [(0, (5,), (1,)), (3, (2,), (1,)), (0, (2, 2), (3, 1)),
                               (0, (2,), (-1,)), (-1, (1,), (1,))]:
    data = _dumps({"w": _tensor(pid, offset, size, stride)})
    _write_zip(tmp_path / "oob.pth", {"a/data.pkl": data, "a/data/0": b"\0" * 16})
    with pytest.raises(CheckpointError, match="outside storage '0'"):
      read_checkpoint(tmp_path / "oob.pth")


# ------------------------------------------------------------------------ broken files
@pytest.fixture
def saved(tmp_path):
  """Paths of one small checkpoint in both torch formats."""
  ckpt = {"state_dict": collections.OrderedDict(w=torch.arange(64.0), b=torch.ones(3))}
  paths = {"zip": tmp_path / "z.pth", "legacy": tmp_path / "l.pth"}
  torch.save(ckpt, paths["zip"])
  torch.save(ckpt, paths["legacy"], _use_new_zipfile_serialization=False)
  return paths


def test_missing_empty_unknown(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint file"):
    read_checkpoint(tmp_path / "nope.pth")
  (tmp_path / "empty.pth").write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty file"):
    read_checkpoint(tmp_path / "empty.pth")
  (tmp_path / "junk.bin").write_bytes(b"hello, this is not a checkpoint\n" * 4)
  with pytest.raises(CheckpointError, match="unknown checkpoint format"):
    read_checkpoint(tmp_path / "junk.bin")


def test_truncated_zip_and_missing_storage(tmp_path, saved):
  data = saved["zip"].read_bytes()
  (tmp_path / "half.pth").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="half.pth: truncated or corrupt zip"):
    read_checkpoint(tmp_path / "half.pth")
  entries = _zip_entries(saved["zip"])
  _write_zip(tmp_path / "short.pth", {**entries, "z/data/0": entries["z/data/0"][:100]})
  with pytest.raises(CheckpointError, match=_TRUNCATED):
    read_checkpoint(tmp_path / "short.pth")
  del entries["z/data/0"]
  _write_zip(tmp_path / "missing.pth", entries)
  with pytest.raises(CheckpointError, match="storage key '0' missing"):
    read_checkpoint(tmp_path / "missing.pth")


def test_truncated_legacy(tmp_path, saved):
  data = saved["legacy"].read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:-6])  # inside the last storage's bytes
  with pytest.raises(CheckpointError, match="cut.pth: " + _TRUNCATED):
    read_checkpoint(tmp_path / "cut.pth")
  (tmp_path / "cut.pth").write_bytes(data[:60])  # inside a pickle
  with pytest.raises(CheckpointError, match="truncated or corrupt pickle"):
    read_checkpoint(tmp_path / "cut.pth")


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_every_cut_is_a_checkpoint_error(tmp_path, saved, kind):
  data = saved[kind].read_bytes()
  for cut in sorted(set(np.linspace(1, len(data) - 1, 60).astype(int))):
    (tmp_path / "cut.pth").write_bytes(data[:cut])
    # Each cut names the file and what is wrong with it (the first byte alone is no
    # known format at all).
    with pytest.raises(CheckpointError, match=r"cut\.pth: (truncated|unknown checkpoint "
                       r"format \(first bytes b'P'\))"):
      read_checkpoint(tmp_path / "cut.pth")


def test_corrupted_legacy_bytes_never_leak_other_errors(tmp_path, saved):
  data = saved["legacy"].read_bytes()
  rng = np.random.default_rng(0)
  for pos in rng.integers(0, len(data), 150):
    broken = bytearray(data)
    broken[pos] ^= int(rng.integers(1, 256))
    (tmp_path / "bad.pth").write_bytes(bytes(broken))
    try:
      read_checkpoint(tmp_path / "bad.pth")
    except CheckpointError:
      pass


def test_truncated_safetensors(tmp_path):
  path = tmp_path / "t.safetensors"
  _write_safetensors(path, {"w": ("F32", np.ones(16, np.float32))})
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(CheckpointError, match="truncated: tensor 'w'"):
    read_checkpoint(path)


def test_big_endian_refused(tmp_path, saved):
  entries = _zip_entries(saved["zip"])
  _write_zip(tmp_path / "be.pth", {**entries, "z/byteorder": b"big"})
  with pytest.raises(CheckpointError, match="byteorder is 'big'"):
    read_checkpoint(tmp_path / "be.pth")
  main = pickle.dumps({}, protocol=2)
  (tmp_path / "be_legacy.pth").write_bytes(_legacy_bytes(main, {}, little_endian=False))
  with pytest.raises(CheckpointError, match="big-endian"):
    read_checkpoint(tmp_path / "be_legacy.pth")


def test_tar_format_refused(tmp_path):
  with tarfile.open(tmp_path / "old.pth", "w") as tar:
    for name in ("sys_info", "pickle", "tensors", "storages"):
      info = tarfile.TarInfo(name)
      info.size = 4
      tar.addfile(info, io.BytesIO(b"\x80\x02N."))
  with pytest.raises(CheckpointError, match="unsupported tar-format checkpoint"):
    read_checkpoint(tmp_path / "old.pth")


# ------------------------------------------------- objects of classes off the allow-list
class _MemoryBank(torch.nn.Module):
  """Stands in for InsDisc's pickled `lemniscate` module (buffers and plain attributes)."""

  def __init__(self):
    super().__init__()
    self.nLem = 5
    self.register_buffer("memory", torch.arange(10.0).reshape(5, 2))
    self.sampler = _Sampler()


class _Sampler:
  """A plain object holding tensors (InsDisc's AliasMethod)."""

  def __init__(self):
    self.prob = torch.ones(3)


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch_zip", "torch_legacy"])
def test_unknown_classes_read_as_inert_data(tmp_path, zip_format):
  """Objects of classes the reader does not know become ForeignObject records of their
  pickled state; nothing of the class is imported or run (legacy files name nn.Module
  classes through a ('module', class, file, source) persistent id)."""
  ckpt = {"state_dict": {"w": torch.ones(2)}, "lemniscate": _MemoryBank(),
          "bank_class": _MemoryBank, "epoch": 3}
  torch.save(ckpt, tmp_path / "m.pth", _use_new_zipfile_serialization=zip_format)
  got, _ = read_checkpoint(tmp_path / "m.pth")
  bank = got["lemniscate"]
  assert isinstance(bank, reader.ForeignObject) and not bank.reference
  assert bank.qualname == f"{__name__}._MemoryBank" and bank.args == ()
  np.testing.assert_array_equal(bank.state["_buffers"]["memory"],
                                np.arange(10.0, dtype=np.float32).reshape(5, 2))
  assert bank.state["nLem"] == 5 and bank.state["training"] is True
  sampler = bank.state["sampler"]
  assert sampler.qualname == f"{__name__}._Sampler"
  np.testing.assert_array_equal(sampler.state["prob"], np.ones(3, np.float32))
  assert got["bank_class"].reference and got["bank_class"].state is None
  assert got["bank_class"].qualname == bank.qualname
  np.testing.assert_array_equal(got["state_dict"]["w"], [1.0, 1.0])


def test_calling_an_unknown_global_refused(tmp_path):
  """Globals outside the standard library are never imported: calling one (REDUCE, or
  INST/OBJ with arguments) is refused, whatever it names."""
  marker = tmp_path / "pwned"
  cases = {
      "torch.hub.load": pickle.dumps(_Call(torch.hub.load, ("repo", "model")), protocol=2),
      "torch.serialization.save": pickle.dumps(_Call(torch.save, ({}, str(marker))),
                                               protocol=4),  # STACK_GLOBAL
      f"{__name__}._Sampler": pickle.dumps(_Call(_Sampler, ()), protocol=2),
      "lib.evil.run": f"clib.evil\nrun\n(V{marker}\ntR.".encode(),
      "lib.evil.Inst": f"(V{marker}\nilib.evil\nInst\n.".encode(),
      "lib.evil.Obj": f"(clib.evil\nObj\nV{marker}\no.".encode(),
  }
  for name, payload in cases.items():
    _write_zip(tmp_path / "evil.pth", {"a/data.pkl": payload})
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to call '{name}' in "
                       r"checkpoint .*evil\.pth: .*nothing was executed"):
      read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


def test_standard_library_inside_an_unknown_object_refused(tmp_path):
  marker = tmp_path / "pwned"
  bank = _MemoryBank()
  bank.hook = _Call(os.system, (f"touch {marker}",))
  torch.save({"lemniscate": bank}, tmp_path / "evil.pth")
  with pytest.raises(UnsafeCheckpointError, match=r"refusing global 'posix\.system'"):
    read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()


def test_unknown_object_abuse_is_a_checkpoint_error(tmp_path):
  cases = {  # payload -> what the error says
      b"clib.mod\nCls\n}b.": "refusing BUILD on a stand-in class",  # BUILD on the class
      b"\x80\x02clib.mod\nCls\n)\x81}b}b.": "second BUILD",
      b"\x80\x02clib.mod\nCls\n)\x81(K\x01K\x02u.": "does not support item",  # SETITEMS
      b"\x80\x02clib.mod\nCls\n)\x81q\x00}(X\x01\x00\x00\x00ah\x00ub.": "self-referencing",
      b"\x80\x04clib.mod\nCls\n)}(X\x01\x00\x00\x00aK\x01u\x92.": "corrupt",  # kwargs
  }
  for payload, needle in cases.items():
    _write_zip(tmp_path / "b.pth", {"a/data.pkl": payload})
    with pytest.raises(CheckpointError, match=needle):
      read_checkpoint(tmp_path / "b.pth")
