"""A run's scalars as TensorBoard event files, written without TensorFlow.

An events file is a TFRecord file of `Event` protos: the file version first, then an
event per `write_scalars`, each scalar a float32 tensor with the "scalars" plugin's
metadata, as `tf.summary.scalar` writes it (TensorBoard, `tf.compat.v1.train.
summary_iterator` and `bitune_jax.experiments.plots` read it). The protos and the
record framing are TensorBoard's own pure-Python ones: a run starts without importing
TensorFlow (5-10 s of every start). A remote workdir (`gs://...`) is written through
clu's TensorFlow writer, which has the file systems.

`read_scalars` reads a run's event files back, ours or TensorFlow's, also without
TensorFlow (TensorBoard's `EventAccumulator` imports it: 6 s of every process that
draws a run's curves).
"""

import glob
import os
import socket
import struct
import time

import numpy as np


def writer(workdir, *, write):
  """The run's metric writer: `write_scalars(step, {tag: value})`, `flush()`,
  `close()`; one that writes nothing when `write` is False (every process but 0)."""
  if not write:
    return _Nothing()
  if "://" in str(workdir):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(str(workdir), asynchronous=True)
  return EventsFile(workdir)


class EventsFile:
  """`workdir/events.out.tfevents.<time>.<host>.<pid>.v2`, one per start of a run."""

  def __init__(self, workdir):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
    from tensorboard.compat.proto import tensor_shape_pb2, types_pb2
    from tensorboard.summary.writer import record_writer
    # pylint: enable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2
    self._scalar = lambda value: tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        float_val=[float(np.asarray(value, np.float32))])
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"events.out.tfevents.{time.time():.0f}."
                             f"{socket.gethostname()}.{os.getpid()}.v2")
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def write_scalars(self, step, scalars):
    """Each `{tag: value}` as a float32 scalar tensor at `step`."""
    values = [self._summary.Summary.Value(tag=tag, metadata=self._metadata,
                                          tensor=self._scalar(value))
              for tag, value in scalars.items()]
    self._write(self._event(wall_time=time.time(), step=int(step),
                            summary=self._summary.Summary(value=values)))
    self.flush()  # a few small writes per logged step: TensorBoard sees them at once

  def flush(self):
    self._records.flush()

  def close(self):
    if not self._file.closed:
      self._records.close()


class _Nothing:
  """The writer of a process that writes no records."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def flush(self):
    pass

  def close(self):
    pass


def read_scalars(run_dir):
  """`{tag: [(step, value), ...]}` of the scalars in `run_dir`'s event files, by step.

  Every start of a run writes its own file; they are read in the order they were
  started (the time of their first event), and a step written again by a later start
  (a run resumed from an earlier checkpoint) keeps the later value. Scalars are read
  as `tf.summary.scalar` and our writer store them (a tensor) and as TensorFlow 1
  stored them (`simple_value`). A record cut short at the end of a file (a process
  killed while writing) ends that file; a corrupt record raises ValueError.
  """
  if "://" in str(run_dir):  # remote file systems: TensorBoard's reader, through TF
    return _read_scalars_tensorboard(run_dir)
  files = []
  for path in glob.glob(os.path.join(glob.escape(str(run_dir)), "*tfevents*")):
    events = list(_events(path))
    if events:
      files.append((events[0].wall_time, path, events))
  out = {}
  for _, _, events in sorted(files, key=lambda f: f[:2]):
    for event in events:
      for value in event.summary.value:
        scalar = _scalar(value)
        if scalar is not None:
          out.setdefault(value.tag, {})[int(event.step)] = scalar
  return {tag: sorted(steps.items()) for tag, steps in out.items()}


def _events(path):
  """The `Event` protos of one TFRecord file, its CRCs checked."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  # pylint: enable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    if header_crc != masked_crc32c(header):
      raise ValueError(f"{path}: corrupt record length at byte {offset}")
    end = offset + 12 + length + 4
    if end > len(data):
      break  # cut short by a process that ended while writing
    record = data[offset + 12:end - 4]
    (record_crc,) = struct.unpack("<I", data[end - 4:end])
    if record_crc != masked_crc32c(record):
      raise ValueError(f"{path}: corrupt record at byte {offset}")
    yield event_pb2.Event.FromString(record)
    offset = end


_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def _scalar(value):
  """A summary value's number, or None when it holds no scalar (an image, text)."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if not value.HasField("tensor"):
    return None
  tensor = value.tensor
  if tensor.tensor_shape.dim:  # scalars only: a shape of () or (1,)
    if [d.size for d in tensor.tensor_shape.dim] != [1]:
      return None
  dtype = _DTYPES.get(tensor.dtype)
  if dtype is None:
    return None
  if tensor.tensor_content:
    return float(np.frombuffer(tensor.tensor_content, dtype)[0])
  for field in ("float_val", "double_val", "int_val", "int64_val", "half_val"):
    values = getattr(tensor, field)
    if values:
      if field == "half_val":  # float16 bits stored in an int32
        return float(np.array(values[0], np.uint16).view(np.float16))
      return float(values[0])
  return None


def _read_scalars_tensorboard(run_dir):
  """`read_scalars` for a remote `run_dir`, through TensorBoard's reader."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0,
                                                                        "tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    for e in acc.Tensors(tag):
      out.setdefault(tag, {})[e.step] = float(np.asarray(
          tensor_util.make_ndarray(e.tensor_proto)).reshape(-1)[0])
  for tag in acc.Tags()["scalars"]:
    for e in acc.Scalars(tag):
      out.setdefault(tag, {})[e.step] = float(e.value)
  return {tag: sorted(steps.items()) for tag, steps in out.items()}
