"""Decoded, resized uint8 image caches on local disk, memory-mapped by later runs.

Each split is decoded and resized once to `[N, S, S, 3]` uint8 (the reference
transform's `Resize((S, S))`: PIL bilinear with antialiasing on the RGB image, aspect
not kept), with each image's original (height, width). The views (crops, flips, colour)
are made on the accelerator from these arrays. A later run memory-maps the file and
starts in seconds; `load` builds the cache when there is none (or a bad one).

File format (one file, little-endian, FORMAT_VERSION 1):

  [0, 4096)              header: UTF-8 JSON padded with spaces to 4096 bytes:
                         {"magic": MAGIC, "version": 1, "key": ..., "side": S,
                          "count": N, "hw_offset": 4096, "images_offset": ...,
                          "size": total bytes, "crc32": ...}
  [4096, 4096 + 8 N)     hw: int32 [N, 2], each image's original (height, width)
  [images_offset, size)  images: uint8 [N, S, S, 3]; images_offset is 4096 plus 8 N
                         rounded up to a multiple of 4096 (page-aligned images)

`crc32` is zlib.crc32 of the hw bytes followed by the N little-endian uint32 crc32s of
the images (one per image, so the workers that build images also checksum them, and
verifying runs in parallel). The file's name is `NAME-HASH.cache`, HASH naming (key,
side, FORMAT_VERSION, N), so a cache of other images or another size is another file.

A cache is never used when its header is unreadable, its magic or version differs,
its key, side or count differs, it is shorter or longer than its layout, or its
checksum fails: it is rebuilt (with a warning naming the file and the reason).
Building writes a temporary file beside the cache (named with the host, pid and a
random part), fsyncs it and renames it into place, so a reader never sees half a
cache, and two processes building the same cache at once both end with a valid file.
Temporary files left by killed builds on this host are removed.
"""

import concurrent.futures
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bitune_jax.data import decode

log = logging.getLogger("bitune_jax")

FORMAT_VERSION = 1
MAGIC = "bitune_jax image cache"
HEADER_BYTES = 4096
_PROGRESS_SECONDS = 5.0  # at most one progress line per this many seconds
_CHUNK = 64  # images per checksum task when verifying


@dataclasses.dataclass
class Cache:
  """A split's decoded, resized images.

  Attributes:
    images: uint8 [N, S, S, 3]: a read-only np.memmap, or an in-memory array.
    hw: int32 [N, 2]: each image's original (height, width).
    path: the cache file's path ("" for an in-memory cache).
  """
  images: np.ndarray
  hw: np.ndarray
  path: str

  def __len__(self) -> int:
    return len(self.images)


def rows_key(rows: np.ndarray) -> str:
  """The sha256 hex digest of an index array (as int64 [N]), for a cache key."""
  rows = np.asarray(rows)
  if rows.size and not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"rows must be integers, got a {rows.dtype} array")
  return hashlib.sha256(np.ascontiguousarray(rows.ravel(), "<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------- names
def _identity(key, side, count):
  """What a cache file holds, as the dict its header repeats (JSON-normalised)."""
  if not isinstance(key, Mapping):
    raise ValueError(f"key must be a mapping, got {type(key).__name__}")
  try:
    text = json.dumps({"key": dict(key), "side": int(side), "count": int(count),
                       "version": FORMAT_VERSION}, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"key {key!r} is not JSON-serialisable: {e}") from e
  return json.loads(text)


def cache_path(key: Mapping[str, Any], *, side: int, count: int, directory: str,
               name: str = "") -> str:
  """The path of the cache of `count` images keyed by `key` at `side` in `directory`."""
  identity = json.dumps(_identity(key, side, count), sort_keys=True,
                        separators=(",", ":"))
  digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
  base = f"{stem}-{digest}.cache" if stem else f"{digest}.cache"
  return os.path.join(directory, base)


def _layout(count, side):
  """(hw offset, images offset, total size) in bytes of a cache file."""
  images_offset = HEADER_BYTES + -(-8 * count // HEADER_BYTES) * HEADER_BYTES
  return HEADER_BYTES, images_offset, images_offset + count * side * side * 3


def _host():
  """A short hash of this machine's host name (temporary files name their host)."""
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_path(path):
  folder, base = os.path.split(path)
  unique = f"{_host()}.{os.getpid()}.{secrets.token_hex(6)}"
  return os.path.join(folder, f".{base}.tmp.{unique}")


def _alive(pid):
  """Whether process `pid` of this host is running (or may be: not ours to signal)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def _remove_leftovers(path):
  """Removes this host's temporary files of `path` whose building process is gone."""
  folder, base = os.path.split(path)
  prefix = os.path.join(folder, f".{base}.tmp.")
  for tmp in glob.glob(glob.escape(prefix) + "*"):
    parts = tmp[len(prefix):].split(".")
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
      continue
    if not _alive(int(parts[1])):
      log.info("removing %s, left by a killed build", tmp)
      try:
        os.unlink(tmp)
      except OSError:
        pass  # another process removed it first


# --------------------------------------------------------------------------- load
def load(key: Mapping[str, Any], source: Sequence, *, side: int, directory: str,
         name: str = "", threads: int | None = None) -> Cache:
  """The cache of `source` keyed by `key`: memory-mapped if built before, else built.

  Args:
    key: JSON-serialisable mapping naming exactly what is cached (e.g. dataset,
      split, `rows_key` of the chosen indices).
    source: sequence (len() and indexing) of encoded image bytes or uint8 arrays
      [H, W, 3] / [H, W, 1] / [H, W]; items are fetched in the calling thread.
    side: S, the cached images' height and width.
    directory: where the cache file lives; "" for an in-memory cache (nothing written).
    name: human-readable name for the file and the log (e.g. "cub-train").
    threads: decoding threads (default: the CPUs this process may use).

  Returns:
    A `Cache` with images uint8 [N, S, S, 3] and hw int32 [N, 2].

  Raises:
    ValueError: bad arguments, or an item that cannot be decoded (naming its index).
  """
  decode.check_side(side)
  count = len(source)
  identity = _identity(key, side, count)
  threads = _threads(threads)
  if count == 0:
    return Cache(np.zeros((0, side, side, 3), np.uint8), np.zeros((0, 2), np.int32), "")
  if not directory:
    label = name or "in-memory"
    images = np.empty((count, side, side, 3), np.uint8)
    hw, crcs = np.empty((count, 2), np.int32), np.empty(count, np.uint32)
    _fill(source, images, hw, crcs, threads=threads, label=label, where="memory")
    return Cache(images, hw, "")
  path = cache_path(key, side=side, count=count, directory=directory, name=name)
  label = name or os.path.basename(path)
  os.makedirs(directory, exist_ok=True)
  _remove_leftovers(path)
  if os.path.lexists(path):
    cache = _open(path, identity, threads=threads, label=label)
    if cache is not None:
      return cache
  return _build_file(path, source, identity, threads=threads, label=label)


def _threads(threads):
  """The number of build threads: `threads`, or the CPUs this process may use."""
  if threads is None:
    if hasattr(os, "sched_getaffinity"):
      return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
    raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
  return threads


def _open(path, identity, *, threads, label):
  """The verified cache at `path`, or None (with a warning) if it must be rebuilt."""
  start = time.perf_counter()
  reason, header = _check_header(path, identity)
  if reason is None:
    cache = _map(path, identity["count"], identity["side"])
    if _checksum(cache.hw, _image_crcs(cache.images, threads)) != header["crc32"]:
      reason = "fails its checksum"
  if reason is not None:
    log.warning("cache %s %s; rebuilding", path, reason)
    return None
  side = identity["side"]
  log.info("cache %s: %d images of %dx%d from %s (verified in %.2f s)", label,
           len(cache), side, side, path, time.perf_counter() - start)
  return cache


def _read_header(path):
  """The header dict of a cache file; ValueError / OSError if it has none."""
  with open(path, "rb") as f:
    raw = f.read(HEADER_BYTES)
  header = json.loads(raw.decode("utf-8"))
  if not isinstance(header, dict) or header.get("magic") != MAGIC:
    raise ValueError("not a cache header")
  return header


def _check_header(path, identity):
  """(why the file at `path` is not the cache `identity` names or None, its header)."""
  try:
    size = os.path.getsize(path)
    header = _read_header(path)
  except OSError as e:
    return f"cannot be read ({e})", None
  except ValueError:  # also UnicodeDecodeError, json.JSONDecodeError
    if size < HEADER_BYTES:
      return f"is truncated ({size} of at least {HEADER_BYTES} bytes)", None
    return "has an unreadable header", None
  if header.get("version") != identity["version"]:
    return (f"has format version {header.get('version')!r}, not "
            f"{identity['version']}"), None
  for field in ("key", "side", "count"):
    if header.get(field) != identity[field]:
      return (f"was built for another {field} ({json.dumps(header.get(field))}, not "
              f"{json.dumps(identity[field])})"), None
  want = _layout(identity["count"], identity["side"])[2]
  if size < want:
    return f"is truncated ({size} of {want} bytes)", None
  if size > want:
    return f"is longer than its layout ({size} of {want} bytes)", None
  if not isinstance(header.get("crc32"), int):
    return "has no checksum", None
  return None, header


def _map(path, count, side):
  """The cache file at `path`, its images memory-mapped read-only."""
  hw_offset, images_offset, _ = _layout(count, side)
  hw = np.memmap(path, np.dtype("<i4"), "r", offset=hw_offset, shape=(count, 2))
  images = np.memmap(path, np.uint8, "r", offset=images_offset,
                     shape=(count, side, side, 3))
  return Cache(images, np.array(hw, np.int32), path)


def _image_crcs(images, threads):
  """uint32 [N]: the crc32 of each image, computed by `threads` threads."""
  def chunk(start):
    return [zlib.crc32(image) for image in images[start:start + _CHUNK]]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    parts = list(pool.map(chunk, range(0, len(images), _CHUNK)))
  return np.array([crc for part in parts for crc in part], np.uint32)


def _checksum(hw, crcs):
  """The header's checksum of hw int32 [N, 2] and the images' crc32s uint32 [N]."""
  crc = zlib.crc32(np.ascontiguousarray(hw, "<i4").tobytes())
  return zlib.crc32(np.ascontiguousarray(crcs, "<u4").tobytes(), crc)


# --------------------------------------------------------------------------- build
def _fill(source, images, hw, crcs, *, threads, label, where):
  """Decodes and resizes `source` into images [N, S, S, 3], hw [N, 2] and crcs [N]
  (each image's crc32), with `threads` threads and progress in the log."""
  count, side = len(images), images.shape[1]
  log.info("caching %s: %d images to %dx%d in %s, %d threads", label, count, side, side,
           where, threads)
  start = shown = time.perf_counter()

  def work(i, item):
    img = decode.to_rgb(item, f"item {i} of {label}")
    images[i] = decode.resize(img, side)
    return i, img.height, img.width, zlib.crc32(images[i])

  done, pending, submitted = 0, set(), 0
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    try:
      while done < count:
        while submitted < count and len(pending) < 4 * threads:  # bounded memory
          pending.add(pool.submit(work, submitted, source[submitted]))
          submitted += 1
        finished, pending = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
          i, h, w, crc = future.result()
          hw[i], crcs[i] = (h, w), crc
        done += len(finished)
        now = time.perf_counter()
        if now - shown >= _PROGRESS_SECONDS and done < count:
          shown, rate = now, done / max(now - start, 1e-9)
          log.info("caching %s: %d/%d (%.0f images/s, ETA %.0f s)", label, done, count,
                   rate, (count - done) / rate)
    except BaseException:
      for future in pending:
        future.cancel()
      raise
  seconds = time.perf_counter() - start
  log.info("cached %s: %d images in %.1f s (%.0f images/s)", label, count, seconds,
           count / max(seconds, 1e-9))


def _build_file(path, source, identity, *, threads, label):
  """Builds the cache file at `path` through a temporary file; returns it mapped."""
  count, side = identity["count"], identity["side"]
  hw_offset, images_offset, size = _layout(count, side)
  _header(identity, 2**32 - 1)  # a key too long for the header fails before the work
  tmp = _temp_path(path)
  try:
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "r+b") as f:
      _allocate(f.fileno(), size)  # a full disk fails here, not as SIGBUS in the map
      raw = np.memmap(f, np.uint8, "r+", shape=(size,))
      hw = raw[hw_offset:hw_offset + 8 * count].view("<i4").reshape(count, 2)
      images = raw[images_offset:].reshape(count, side, side, 3)
      crcs = np.empty(count, np.uint32)
      _fill(source, images, hw, crcs, threads=threads, label=label, where=path)
      header = _header(identity, _checksum(hw, crcs))
      raw[:HEADER_BYTES] = np.frombuffer(header, np.uint8)
      raw.flush()
      del raw, hw, images
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  _fsync_directory(os.path.dirname(path))
  return _map(path, count, side)


def _allocate(fd, size):
  """Reserves `size` bytes of the file `fd` on disk (ENOSPC raises OSError here)."""
  try:
    os.posix_fallocate(fd, 0, size)
  except (AttributeError, OSError) as e:  # unsupported here: a sparse file instead
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      raise
    os.ftruncate(fd, size)


def _header(identity, crc):
  """The header bytes (HEADER_BYTES) of a cache with checksum `crc`."""
  hw_offset, images_offset, size = _layout(identity["count"], identity["side"])
  header = dict(magic=MAGIC, **identity, hw_offset=hw_offset,
                images_offset=images_offset, size=size, crc32=int(crc))
  text = json.dumps(header, sort_keys=True).encode()
  if len(text) > HEADER_BYTES:
    raise ValueError(f"the cache key is too long: its header needs {len(text)} bytes, "
                     f"at most {HEADER_BYTES}")
  return text.ljust(HEADER_BYTES, b" ")


def _fsync_directory(folder):
  try:
    fd = os.open(folder or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
