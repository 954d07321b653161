"""A run's scalars as TensorBoard event files, written without TensorFlow.

An events file is a TFRecord file of `Event` protos: the file version first, then an
event per `write_scalars`, each scalar a float32 tensor with the "scalars" plugin's
metadata, as `tf.summary.scalar` writes it (TensorBoard, `tf.compat.v1.train.
summary_iterator` and `bitune_jax.experiments.plots` read it). The protos and the
record framing are TensorBoard's own pure-Python ones: a run starts without importing
TensorFlow (5-10 s of every start). A remote workdir (`gs://...`) is written through
clu's TensorFlow writer, which has the file systems.
"""

import os
import socket
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
