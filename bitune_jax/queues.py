"""Key stores for contrastive fine-tuning: pytrees and pure updates.

* `ClassQueues`: Bi-tuning's per-class key queues, `[C, K, D]` plus a pointer per class
  (Bi-tuning paper, Appendix B.1: MoCo's queue reorganised per category).
* `FifoQueue`: MoCo's queue of negatives, `[N, D]` plus one pointer.
* `MemoryBank`: per-example keys updated by index with momentum (Appendix B.2, Eqs.
  7-8); `class_index_table` and `sample_class_keys` draw K keys per class from it.

All updates are vectorised (no Python loop over the batch) and write every slot at most
once: a duplicate index in a scatter has no defined winner, so each update first decides
which writes survive and sends the others out of bounds, where `mode='drop'` discards
them. They run unchanged on a queue sharded over its first axis.
"""

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bitune_jax.losses import check_labels, l2_normalize


def inplace_update_compiler_options(backend: Optional[str] = None) -> dict:
  """`compiler_options` for a `jax.jit` that reads a donated queue and updates it.

  A step that scores against a queue and then enqueues into it (donated) should write
  in place. XLA:CPU's default copy insertion instead copies such a buffer twice
  (measured: +2 x 262 MB per step for a 1000 x 32 x 2049 queue); its region analysis
  sees that the reads come first and drops the copies. Other backends need nothing.
  (That is with XLA:CPU's default fusion emitters; with
  `--xla_cpu_use_fusion_emitters=false` it copies the queue whatever this option says.)

  Usage: `jax.jit(step, donate_argnums=0, compiler_options=inplace_update_compiler_options())`.
  """
  backend = backend or jax.default_backend()
  return {"xla_cpu_copy_insertion_use_region_analysis": True} if backend == "cpu" else {}


def _random_unit_keys(rng, shape, dtype):
  return l2_normalize(jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


def _initial_keys(fn, rng, size, dim, dtype):
  """`[size, dim]` random unit keys of a FIFO queue or memory bank."""
  if size < 1 or dim < 1:
    raise ValueError(f"{fn}: size and dim must be >= 1, got {size}, {dim}")
  return _random_unit_keys(rng, (size, dim), dtype)


def _rank_in_group(ids):
  """For `ids [B]`: rank of each entry among equal ids in batch order, and group size."""
  batch = ids.shape[0]
  same = ids[:, None] == ids[None, :]  # [B, B]
  earlier = jnp.arange(batch)[None, :] < jnp.arange(batch)[:, None]  # [j, i]: i < j
  rank = jnp.sum(same & earlier, axis=1)  # [B]
  count = jnp.sum(same, axis=1)  # [B]
  return rank, count


def _check_keys(fn, keys, dim, batch_name, ids):
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"{fn}: keys must be [B, {dim}], got {keys.shape}")
  if ids.ndim != 1 or ids.shape[0] != keys.shape[0]:
    raise ValueError(f"{fn}: {batch_name} must be [B={keys.shape[0]}], got {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{fn}: {batch_name} must be integers, got {ids.dtype}")


# --------------------------------------------------------------------------- per class
@flax.struct.dataclass
class ClassQueues:
  """Per-class key queues. `keys [C, K, D]`; `ptr [C]` int32, next slot of each class."""
  keys: jax.Array
  ptr: jax.Array

  @property
  def num_classes(self):
    return self.keys.shape[0]

  @property
  def size(self):
    return self.keys.shape[1]


def init_class_queues(rng: jax.Array, *, num_classes: int, size: int, dim: int,
                      dtype: Any = jnp.float32) -> "ClassQueues":
  """`[num_classes, size, dim]` of L2-normalised random normals, pointers at 0."""
  if num_classes < 1 or size < 1 or dim < 1:
    raise ValueError(f"init_class_queues: num_classes, size and dim must be >= 1, got "
                     f"{num_classes}, {size}, {dim}")
  return ClassQueues(keys=_random_unit_keys(rng, (num_classes, size, dim), dtype),
                     ptr=jnp.zeros((num_classes,), jnp.int32))


def class_write_positions(ptr: ArrayLike, labels: ArrayLike, *, size: int,
                          valid: Optional[ArrayLike] = None) -> tuple:
  """Where `enqueue_by_class` writes each key: `(row [B], slot [B])`, all distinct.

  Key j goes to `(labels[j], (ptr[labels[j]] + rank_j) mod size)` if it is among the
  last `size` keys of its class in the batch; otherwise to row `C + j`, out of bounds,
  so that no slot is written twice. Keys with `valid[j]` False (and labels outside
  [0, C)) are not enqueued and take no rank. `labels` may be a Python list of ints.
  """
  labels = jnp.asarray(labels)
  num_classes, batch = ptr.shape[0], labels.shape[0]
  order = jnp.arange(batch)
  ok = (labels >= 0) & (labels < num_classes)
  if valid is not None:
    ok = ok & valid
  ids = jnp.where(ok, labels, -1 - order)  # the skipped keys: a group of their own
  rank, count = _rank_in_group(ids)
  survives = ok & (rank >= count - size)  # only the last K of a class in this batch
  slot = (ptr[jnp.clip(labels, 0, num_classes - 1)] + rank) % size  # [B]
  row = jnp.where(survives, labels, num_classes + order)
  return row, slot


def enqueue_by_class(queues: "ClassQueues", *, keys: ArrayLike,
                     labels: ArrayLike) -> "ClassQueues":
  """Writes each key into its class's queue, as if one at a time in batch order.

  Key j of class c goes to slot `(ptr[c] + r_j) mod K`, where r_j is its rank among
  the batch's class-c keys; then `ptr[c] += count_c` (kept mod K). When a class has
  more than K keys in the batch, the last K survive, which is also what enqueuing one
  at a time gives. Keys are stored as given (normalise before enqueueing).

  Labels follow `bitune_jax.losses`' rule: a negative label means "no label" and its
  key is not enqueued; a label >= C is a ValueError when the labels are concrete, and
  under jit its key is not enqueued. A key with a NaN or infinite entry is never
  enqueued (it would poison every later step's losses); it takes no slot and moves no
  pointer.

  Args:
    queues: `ClassQueues` with keys `[C, K, D]`.
    keys: `[B, D]` new keys.
    labels: `[B]` int class of each key, in [0, C), or negative (no label); an array
      or a Python list or tuple.

  Returns:
    The updated `ClassQueues`.
  """
  num_classes, size, dim = queues.keys.shape
  _check_keys("enqueue_by_class", keys, dim, "labels", jnp.asarray(labels))
  labels = check_labels("enqueue_by_class", labels, keys.shape[0], num_classes)
  labels = labels.astype(jnp.int32)
  finite = jnp.all(jnp.isfinite(keys), axis=1)  # [B]
  row, slot = class_write_positions(queues.ptr, labels, size=size, valid=finite)
  new_keys = queues.keys.at[row, slot].set(
      keys.astype(queues.keys.dtype), mode="drop", unique_indices=True)
  enqueued = finite & (labels >= 0)
  added = jnp.zeros((num_classes,), jnp.int32).at[
      jnp.where(enqueued, labels, num_classes)].add(1, mode="drop")
  return queues.replace(keys=new_keys, ptr=(queues.ptr + added) % size)


# --------------------------------------------------------------------------- MoCo FIFO
@flax.struct.dataclass
class FifoQueue:
  """MoCo's queue of negatives. `keys [N, D]`; `ptr []` int32, the oldest slot."""
  keys: jax.Array
  ptr: jax.Array

  @property
  def size(self):
    return self.keys.shape[0]


def init_fifo_queue(rng: jax.Array, *, size: int, dim: int,
                    dtype: Any = jnp.float32) -> "FifoQueue":
  """`[size, dim]` of L2-normalised random normals, pointer at 0."""
  return FifoQueue(keys=_initial_keys("init_fifo_queue", rng, size, dim, dtype),
                   ptr=jnp.zeros((), jnp.int32))


def enqueue_fifo(queue: "FifoQueue", *, keys: ArrayLike) -> "FifoQueue":
  """Replaces the B oldest keys by `keys [B, D]` (the last N of them if B > N)."""
  size, dim = queue.keys.shape
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"enqueue_fifo: keys must be [B, {dim}], got {keys.shape}")
  batch = keys.shape[0]
  order = jnp.arange(batch)
  slot = jnp.where(order >= batch - size, (queue.ptr + order) % size, size + order)
  new_keys = queue.keys.at[slot].set(keys.astype(queue.keys.dtype), mode="drop",
                                     unique_indices=True)
  return queue.replace(keys=new_keys, ptr=(queue.ptr + batch) % size)


# --------------------------------------------------------------------------- memory bank
@flax.struct.dataclass
class MemoryBank:
  """One key per training example, `keys [N, D]` (Wu et al. 2018)."""
  keys: jax.Array

  @property
  def size(self):
    return self.keys.shape[0]


def init_memory_bank(rng: jax.Array, *, size: int, dim: int,
                     dtype: Any = jnp.float32) -> "MemoryBank":
  """`[size, dim]` of L2-normalised random normals."""
  return MemoryBank(keys=_initial_keys("init_memory_bank", rng, size, dim, dtype))


def update_memory_bank(bank: "MemoryBank", *, indices: ArrayLike, values: ArrayLike,
                       momentum: float = 0.5, renormalize: bool = True) -> "MemoryBank":
  """Bi-tuning Eq. (7): `z_i <- m z_i + (1 - m) z_q_i` for the batch's examples.

  Args:
    bank: `MemoryBank` with keys `[N, D]`.
    indices: `[B]` int example index of each value, in [0, N).
    values: `[B, D]` new projections of those examples.
    momentum: m (0.5 in the paper, after Wu et al.).
    renormalize: L2-normalise the updated keys, as Wu et al. do.

  Returns:
    The updated `MemoryBank`. An index repeated in the batch is updated once, from its
    last occurrence.
  """
  size, dim = bank.keys.shape
  indices = jnp.asarray(indices)  # a Python list of ints too
  _check_keys("update_memory_bank", values, dim, "indices", indices)
  indices = indices.astype(jnp.int32)
  batch = indices.shape[0]
  rank, count = _rank_in_group(indices)
  last = rank == count - 1
  old = bank.keys[indices].astype(jnp.float32)
  new = momentum * old + (1.0 - momentum) * values.astype(jnp.float32)
  if renormalize:
    new = l2_normalize(new)
  slot = jnp.where(last, indices, size + jnp.arange(batch))
  keys = bank.keys.at[slot].set(new.astype(bank.keys.dtype), mode="drop",
                                unique_indices=True)
  return bank.replace(keys=keys)


def class_index_table(labels: ArrayLike, *, num_rows: int) -> tuple[Any, Any]:
  """Where each class's examples are in a memory bank, for `sample_class_keys`.

  Args:
    labels: `[N]` int class of each bank row (negative: a padding row, never drawn).
    num_rows: C', the rows of the table (>= every label + 1; padding classes have no
      examples).

  Returns:
    `(table [C', M] int32, counts [C'] int32)` (NumPy): row c lists the bank rows of
    class c in order, padded with 0; M is the largest class's count (at least 1).

  A host-side function (NumPy out, M depends on the labels' values): called on traced
  labels (under `jit`, `vmap` or `grad`) it raises a one-line `TypeError`; labels
  closed over by a jitted function are concrete and work. Build the table once, before
  the step, and pass it in.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  for name, value in (("labels", labels), ("num_rows", num_rows)):
    if isinstance(value, jax.core.Tracer):
      raise TypeError(f"class_index_table: a host-side function (NumPy out); call it "
                      f"outside jit, grad and vmap, got a traced `{name}`")
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and labels.max() >= num_rows):
    raise ValueError(f"class_index_table: labels must be [N] in [0, {num_rows}) or "
                     f"negative, got shape {labels.shape}, max {labels.max(initial=-1)}")
  counts = np.bincount(labels[labels >= 0], minlength=num_rows).astype(np.int32)
  table = np.zeros((num_rows, max(int(counts.max(initial=0)), 1)), np.int32)
  for c in np.flatnonzero(counts):
    rows = np.flatnonzero(labels == c)
    table[c, :len(rows)] = rows
  return table, counts


def sample_class_keys(keys: ArrayLike, *, table: ArrayLike, counts: ArrayLike,
                      rng: jax.Array, size: int) -> jax.Array:
  """Bi-tuning's keys from a memory bank (Appendix B.2): for each class, `size` bank
  rows drawn uniformly, with replacement, among that class's examples.

  Args:
    keys: `[N, D]` the bank's keys.
    table, counts: `class_index_table` of the bank's labels, `[C', M]` and `[C']`.
    rng: the draw's key.
    size: K, keys per class.

  Returns:
    `[C', K, D]`, shaped as `ClassQueues.keys`; a class without examples (padding)
    gets bank row 0 in every slot (padding rows take no part in the losses). Class c
    draws `uniform(fold_in(rng, c), [K])`: its rows do not depend on C'.
  """
  num_rows = table.shape[0]
  # Each class's draws from its own key: a class draws the same rows however many
  # padding classes the device count adds.
  draw = jax.vmap(lambda c: jax.random.uniform(jax.random.fold_in(rng, c), (size,)))(
      jnp.arange(num_rows))  # [C', K]
  pick = jnp.floor(draw * counts[:, None]).astype(jnp.int32)
  pick = jnp.clip(pick, 0, jnp.maximum(counts[:, None] - 1, 0))  # u * n < n, in floats
  rows = jnp.take_along_axis(table, pick, axis=1)  # [C', K]
  return jnp.take(keys, rows, axis=0)  # [C', K, D]
