"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C, at a step every process
agrees on, so that the run saves that step and the same command resumes there.

A TPU VM, a spot instance or a batch scheduler sends SIGTERM some seconds before it
takes the machine. One process: a handler notes the signal and the loop stops after the
step in flight. Several processes (`jax.distributed`): the signal may reach only one of
them, so JAX's preemption service (which listens to SIGTERM in every process) spreads it
and names a step that all processes reach (`reached_preemption_sync_point`); Ctrl-C is
turned into that same notice. A second Ctrl-C interrupts at once.

Handlers nest: a `StopSignals` installed while another is (a run's loop inside
`bitune-sweep`) passes what it gets to the outer one, and starts with a signal the outer
one already got, so that the sweep stops too, whatever phase the signal came in.
"""

import logging
import os
import signal
import threading

import jax

log = logging.getLogger("bitune_jax")

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Stopped(Exception):
  """The loop stopped on a signal after saving `step` (raised out of the loop)."""

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum, self.directory = step, signum, directory
    super().__init__(f"stopped by {NAMES.get(signum, signum)} at step {step}; its "
                     f"checkpoint is saved in {directory}; the same command resumes")


def _preemption_service() -> bool:
  """JAX's preemption sync manager is running (several processes)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return (jax.process_count() > 1
          and distributed.global_state.preemption_sync_manager is not None)


class StopSignals:
  """While active, SIGTERM and SIGINT ask the loop to stop; `should_stop(step)` is
  called by every process at every step and answers the same in all of them."""

  def __init__(self, what="stopping after the current step to save a checkpoint"):
    self.signum = None
    self._what = what  # what the notice says will happen
    self._shared = _preemption_service()
    self._previous = {}
    self._outer = None  # the StopSignals this one is installed inside, if any

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # handlers can only be set in the main thread: signals act as usual
    outer = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    if isinstance(outer, StopSignals):  # e.g. a run's loop inside a sweep
      self._outer = outer
      self.signum = self.signum or outer.signum  # got before this one: stop at once
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
    if not self._shared:  # with several processes JAX's own SIGTERM handler is in place
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous, self._outer = {}, None

  def _on_signal(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: now
    if self.signum is None:
      self.signum = signum
      log.warning("%s: %s%s", NAMES[signum], self._what,
                  " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    if self._outer is not None and self._outer.signum is None:
      self._outer.signum = signum  # the sweep around this run stops too
    if self._shared and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notice reaches every process

  def should_stop(self, step: int) -> bool:
    if self._shared:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
