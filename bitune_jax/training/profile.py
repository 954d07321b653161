"""`config.profile_steps`: a `jax.profiler` trace of that many steps into the workdir
(TensorBoard's profile tab), starting two steps after the first so that compilation is
not in it."""

import logging

import jax

log = logging.getLogger("bitune_jax")


class Profiler:
  """`after(step, state)` after each step, `stop()` when the loop ends however."""

  def __init__(self, workdir, first, count):
    # Traced: steps first + 3 .. first + 2 + count.
    self.start_after, self.stop_after = first + 2, first + 2 + count
    self.workdir, self.count, self.running = workdir, count, False

  def after(self, step, state):
    if not self.count:
      return
    if step == self.start_after:
      jax.profiler.start_trace(str(self.workdir))
      self.running = True
    elif self.running and step == self.stop_after:
      jax.block_until_ready(state)
      self.stop()
      log.info("profile of steps %d-%d written to %s (tensorboard --logdir)",
               self.start_after + 1, self.stop_after, self.workdir)

  def stop(self):
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
