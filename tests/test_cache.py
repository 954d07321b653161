"""Decoded image caches: equal to a plain PIL reference, memory-mapped when reopened,
rebuilt (never used) when stale, truncated, corrupt or unreadable, atomic builds."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bitune_jax.data import cache, decode

import fakes  # pylint: disable=g-bad-import-order
import image_samples as samples  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_reference(got, source, side):
  images, hw = samples.reference(source, side)
  assert got.images.dtype == np.uint8
  assert got.images.shape == (len(source), side, side, 3)
  assert got.hw.dtype == np.int32 and got.hw.shape == (len(source), 2)
  np.testing.assert_array_equal(np.asarray(got.images), images)
  np.testing.assert_array_equal(got.hw, hw)
  assert len(got) == len(source)


def _messages(records):
  return [r.getMessage() for r in records]


def _env():
  """The environment of a child Python that imports this checkout's bitune_jax."""
  return {**os.environ,
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _no_rebuild(monkeypatch):
  """Makes any decode or resize fail: a load that returns did not build."""
  def fail(*args):
    raise AssertionError("rebuilt")
  monkeypatch.setattr(decode, "resize", fail)
  monkeypatch.setattr(decode, "decode_pil", fail)


# --------------------------------------------------------------------------- builds
@pytest.mark.parametrize("directory", ["disk", ""])
def test_build_equals_pil_reference(rng, tmp_path, directory):
  source, side = samples.source(rng), int(rng.integers(8, 40))
  got = cache.load({"t": 1}, source, side=side,
                   directory=str(tmp_path) if directory else "", name="mix")
  _assert_reference(got, source, side)
  assert got.path == ("" if not directory else
                      cache.cache_path({"t": 1}, side=side, count=len(source),
                                       directory=str(tmp_path), name="mix"))


def test_reopen_maps_without_rebuilding(rng, tmp_path, monkeypatch):
  source, side, key = samples.source(rng, 12), 16, {"dataset": "x", "rows": "abc"}
  first = cache.load(key, source, side=side, directory=str(tmp_path), name="x-train")
  _no_rebuild(monkeypatch)
  start = time.perf_counter()
  with fakes.our_log("INFO") as records:
    again = cache.load(key, source, side=side, directory=str(tmp_path), name="x-train")
  seconds = time.perf_counter() - start
  assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
  assert again.path == first.path and seconds < 2
  building = [m for m in _messages(records) if m.startswith(("caching", "cached"))]
  assert not building, building
  assert any(m.startswith(f"cache x-train: 12 images of 16x16 from {first.path}")
             for m in _messages(records)), _messages(records)
  monkeypatch.undo()
  _assert_reference(again, source, side)
  assert os.listdir(tmp_path) == [os.path.basename(first.path)]


def test_other_side_is_another_file(rng, tmp_path, monkeypatch):
  source, key = samples.source(rng, 5), {"k": [1, 2]}
  small = cache.load(key, source, side=8, directory=str(tmp_path))
  large = cache.load(key, source, side=12, directory=str(tmp_path))
  assert small.path != large.path
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(p) for p in (small.path, large.path))
  _no_rebuild(monkeypatch)
  for side, built in ((8, small), (12, large)):
    again = cache.load(key, source, side=side, directory=str(tmp_path))
    assert again.path == built.path
    np.testing.assert_array_equal(again.images, built.images)
  monkeypatch.undo()
  _assert_reference(small, source, 8)
  _assert_reference(large, source, 12)


def test_stale_key_is_rebuilt(rng, tmp_path):
  """A file holding another key's images, under this key's name, is never used."""
  old, new, side = samples.source(rng, 6), samples.source(rng, 6), 10
  built = cache.load({"rows": "old"}, old, side=side, directory=str(tmp_path))
  path = cache.cache_path({"rows": "new"}, side=side, count=6, directory=str(tmp_path))
  shutil.copyfile(built.path, path)
  with fakes.our_log("WARNING") as records:
    got = cache.load({"rows": "new"}, new, side=side, directory=str(tmp_path))
  assert got.path == path
  assert any(f"cache {path} was built for another key" in m and "rebuilding" in m
             for m in _messages(records)), _messages(records)
  _assert_reference(got, new, side)


def _flip(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << int(np.random.default_rng(offset).integers(8)))]))


def _rewrite_header(path, **changes):
  with open(path, "r+b") as f:
    header = json.loads(f.read(cache.HEADER_BYTES))
    header.update(changes)
    f.seek(0)
    f.write(json.dumps(header).encode().ljust(cache.HEADER_BYTES, b" "))


def _damage(kind, path, rng, count, side):
  """Damages the cache file at `path`; returns the message its next load must log."""
  size = os.path.getsize(path)
  _, images_offset, _ = cache._layout(count, side)  # pylint: disable=protected-access
  if kind == "truncated":
    cut = int(rng.integers(1, size - cache.HEADER_BYTES))
    os.truncate(path, size - cut)
    return f"is truncated ({size - cut} of {size} bytes)"
  if kind == "header_cut":
    os.truncate(path, int(rng.integers(0, cache.HEADER_BYTES)))
    return "is truncated"
  if kind == "longer":
    with open(path, "ab") as f:
      f.write(b"\0" * int(rng.integers(1, 100)))
    return "is longer than its layout"
  if kind == "image_byte":
    _flip(path, int(rng.integers(images_offset, size)))
    return "fails its checksum"
  if kind == "hw_byte":
    _flip(path, cache.HEADER_BYTES + int(rng.integers(0, 8 * count)))
    return "fails its checksum"
  if kind == "garbage_header":
    with open(path, "r+b") as f:
      f.write(rng.integers(0, 256, cache.HEADER_BYTES, dtype=np.uint8).tobytes())
    return "has an unreadable header"
  if kind == "version":
    _rewrite_header(path, version=cache.FORMAT_VERSION + 1)
    return "has format version"
  if kind == "count":
    _rewrite_header(path, count=count + 1)
    return "was built for another count"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "header_cut", "longer", "image_byte",
                                  "hw_byte", "garbage_header", "version", "count"])
def test_bad_file_is_rebuilt(rng, tmp_path, kind):
  source, side, key = samples.source(rng, 7), 12, {"split": "train"}
  built = cache.load(key, source, side=side, directory=str(tmp_path), name="bad")
  path = built.path
  del built  # unmap before damaging (a map of a cut file faults on access)
  expected = _damage(kind, path, rng, len(source), side)
  with fakes.our_log("INFO") as records:
    got = cache.load(key, source, side=side, directory=str(tmp_path), name="bad")
  warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and warnings[0].startswith(f"cache {path} "), warnings
  assert expected in warnings[0] and warnings[0].endswith("; rebuilding"), warnings
  assert any(m.startswith("cached bad: 7 images") for m in _messages(records))
  _assert_reference(got, source, side)
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  with fakes.our_log("WARNING") as records:  # the rebuilt file is good
    cache.load(key, source, side=side, directory=str(tmp_path), name="bad")
  assert not records


# --------------------------------------------------------------------------- atomicity
_KILLED_BUILD = """
import sys, time
import numpy as np
from bitune_jax.data import cache, decode
resize = decode.resize
def slow(img, side):
  time.sleep(0.02)
  return resize(img, side)
decode.resize = slow
source = [np.full((20, 30, 3), i % 256, np.uint8) for i in range(2000)]
cache.load({"k": 1}, source, side=16, directory=sys.argv[1], name="killed", threads=1)
"""


def test_killed_build_leaves_no_cache_and_its_leftover_is_removed(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path)],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  try:
    while not [f for f in os.listdir(tmp_path) if ".tmp." in f]:
      assert proc.poll() is None, proc.stdout.read().decode()
      assert time.monotonic() < deadline, "no temporary file appeared"
      time.sleep(0.05)
    time.sleep(0.2)  # some images written
  finally:
    proc.kill()
    proc.wait()
  (leftover,) = os.listdir(tmp_path)
  host = cache._host()  # pylint: disable=protected-access
  assert leftover.startswith(".killed-") and f".tmp.{host}.{proc.pid}." in leftover
  source = [np.full((20, 30, 3), i % 256, np.uint8) for i in range(2000)]
  with fakes.our_log("INFO") as records:
    got = cache.load({"k": 1}, source, side=16, directory=str(tmp_path),
                     name="killed")
  assert any("left by a killed build" in m for m in _messages(records))
  assert os.listdir(tmp_path) == [os.path.basename(got.path)]
  np.testing.assert_array_equal(got.images[:, 0, 0, 0], np.arange(2000) % 256)
  np.testing.assert_array_equal(got.hw, np.tile([20, 30], (2000, 1)))


def test_live_builds_temporary_file_is_kept_and_not_read(rng, tmp_path):
  """A temporary file of a running process (here: this one) is someone's build."""
  source, side = samples.source(rng, 4), 8
  path = cache.cache_path({"a": 0}, side=side, count=4, directory=str(tmp_path))
  live = (f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp."
          f"{cache._host()}.{os.getpid()}.abc")  # pylint: disable=protected-access
  with open(live, "wb") as f:
    f.write(b"garbage")
  got = cache.load({"a": 0}, source, side=side, directory=str(tmp_path))
  _assert_reference(got, source, side)
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path),
                                                 os.path.basename(live)])


def test_concurrent_builds_of_one_cache_both_end_valid(rng, tmp_path):
  source, side, results = samples.source(rng, 30), 12, []
  barrier = threading.Barrier(2)

  def build():
    barrier.wait()
    results.append(cache.load({"same": True}, source, side=side,
                              directory=str(tmp_path), threads=2))

  workers = [threading.Thread(target=build) for _ in range(2)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  assert len(results) == 2 and results[0].path == results[1].path
  for got in results:
    _assert_reference(got, source, side)
  assert os.listdir(tmp_path) == [os.path.basename(results[0].path)]
  with fakes.our_log("WARNING") as records:
    _assert_reference(cache.load({"same": True}, source, side=side,
                                 directory=str(tmp_path)), source, side)
  assert not records


# --------------------------------------------------------------------------- options
def test_threads_do_not_change_the_file(rng, tmp_path):
  source, side = samples.source(rng, 40), 14
  one = cache.load({"t": 0}, source, side=side, directory=str(tmp_path / "one"),
                   threads=1)
  four = cache.load({"t": 0}, source, side=side, directory=str(tmp_path / "four"),
                    threads=4)
  memory = cache.load({"t": 0}, source, side=side, directory="", threads=4)
  with open(one.path, "rb") as f1, open(four.path, "rb") as f4:
    assert f1.read() == f4.read()
  np.testing.assert_array_equal(memory.images, one.images)
  np.testing.assert_array_equal(memory.hw, one.hw)
  _assert_reference(one, source, side)


def test_in_memory_writes_nothing(rng, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  source = samples.source(rng, 5)
  got = cache.load({"m": 1}, source, side=9, directory="", name="mem", threads=3)
  assert got.path == "" and not isinstance(got.images, np.memmap)
  assert os.listdir(tmp_path) == []
  _assert_reference(got, source, 9)


def test_empty_source(tmp_path):
  """An empty split is an empty in-memory cache: no file to write or map."""
  got = cache.load({"e": 1}, [], side=7, directory=str(tmp_path))
  assert got.images.shape == (0, 7, 7, 3) and got.images.dtype == np.uint8
  assert got.hw.shape == (0, 2) and got.hw.dtype == np.int32 and len(got) == 0
  assert got.path == "" and os.listdir(tmp_path) == []


def test_progress_is_logged(rng, tmp_path, monkeypatch):
  monkeypatch.setattr(cache, "_PROGRESS_SECONDS", 0.0)
  source = samples.source(rng, 20)
  with fakes.our_log("INFO") as records:
    got = cache.load({"p": 1}, source, side=8, directory=str(tmp_path), name="prog",
                     threads=2)
  messages = _messages(records)
  assert messages[0] == f"caching prog: 20 images to 8x8 in {got.path}, 2 threads"
  progress = [m for m in messages[1:-1] if m.startswith("caching prog: ")]
  assert progress and all("/20 (" in m and "images/s, ETA" in m for m in progress)
  counts = [int(m.split(": ")[1].split("/")[0]) for m in progress]
  assert counts == sorted(counts) and counts[-1] < 20
  assert messages[-1].startswith("cached prog: 20 images in ")


# --------------------------------------------------------------------------- errors
def test_undecodable_item_names_its_index(rng, tmp_path):
  source = samples.source(rng, 10)
  bad = int(rng.integers(0, 10))
  source[bad] = (samples.item("jpeg", rng)[:40] if rng.integers(2) else
                 rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match=rf"^item {bad} of bad cannot be decoded: \w+"):
    cache.load({"u": 1}, source, side=8, directory=str(tmp_path), name="bad")
  assert os.listdir(tmp_path) == []  # no cache, no temporary file


@pytest.mark.parametrize("item, message", [
    (np.zeros((4, 4, 3), np.float32), "float32 array; expected uint8"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    (np.zeros((0, 4, 3), np.uint8), r"shape \(0, 4, 3\)"),
    (np.zeros(4, np.uint8), r"shape \(4,\)"),
    ("a string", "expected uint8"),
])
def test_bad_array_item(rng, item, message):
  source = samples.source(rng, 3) + [item]
  with pytest.raises(ValueError, match=f"^item 3 of arr .*{message}"):
    cache.load({"b": 1}, source, side=8, directory="", name="arr")


@pytest.mark.parametrize("kwargs, message", [
    ({"side": 0}, "side must be an integer >= 1"),
    ({"side": 2.5}, "side must be an integer >= 1"),
    ({"key": {"x": object()}}, "not JSON-serialisable"),
    ({"key": {"x": float("nan")}}, "not JSON-serialisable"),
    ({"key": ["not", "a", "mapping"]}, "key must be a mapping"),
    ({"key": {"x": "y" * 5000}}, "the cache key is too long"),
    ({"threads": 0}, "threads must be an integer >= 1"),
])
def test_bad_arguments(rng, tmp_path, monkeypatch, kwargs, message):
  """Fail before any image is decoded, and leave nothing behind."""
  args = {"key": {"k": 1}, "side": 8, "directory": str(tmp_path), **kwargs}
  source = samples.source(rng, 2)
  _no_rebuild(monkeypatch)
  with pytest.raises(ValueError, match=message):
    cache.load(args.pop("key"), source, **args)
  assert os.listdir(tmp_path) == []


def test_rows_key(rng):
  rows = rng.permutation(50)[:20]
  import hashlib  # pylint: disable=g-import-not-at-top
  assert cache.rows_key(rows) == hashlib.sha256(
      np.array([int(r) for r in rows], dtype="<i8").tobytes()).hexdigest()
  assert cache.rows_key(rows.astype(np.int32)) == cache.rows_key(rows)
  assert cache.rows_key(rows[::-1]) != cache.rows_key(rows)
  with pytest.raises(ValueError, match="integers"):
    cache.rows_key(rows.astype(float))


def test_module_imports_neither_jax_nor_tensorflow():
  code = ("import sys; from bitune_jax.data import cache; "
          "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out
