"""Real `bitune-train` processes for the multi-process tests: N processes of K simulated
CPU devices each, joined by `jax.distributed` on a free localhost port; a run that hangs
is killed. Also reads a workdir's TensorBoard scalars and final checkpoint."""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def config_flags(config_file, overrides):
  """`--config ROOT/configs/FILE --config.k=v ...` for `{dotted field: value}`."""
  return (["--config", os.path.join(ROOT, "configs", config_file)]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


@dataclasses.dataclass
class Run:
  """The processes of one `bitune-train` command, their logs in `logs`."""
  procs: list
  logs: list

  def log(self, i=0):
    with open(self.logs[i]) as f:
      return f.read()

  def wait_for(self, pattern, timeout=600, i=0):
    """Waits until process i's log matches `pattern` (fails if all ended first)."""
    end = time.time() + timeout
    while time.time() < end:
      match = re.search(pattern, self.log(i))
      if match:
        return match
      if all(p.poll() is not None for p in self.procs):
        break
      time.sleep(0.05)
    self.kill()
    raise AssertionError(f"no {pattern!r} in the log:\n{self.log(i)[-3000:]}")

  def signal(self, signum, i=0):
    self.procs[i].send_signal(signum)

  def wait(self, timeout=600):
    """The return codes; every process is killed if any is still running at
    `timeout` (a hang is a failure, not a stuck suite)."""
    end = time.time() + timeout
    try:
      return [p.wait(timeout=max(1, end - time.time())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError("processes still running after %d s:\n%s" % (
          timeout, "\n".join(self.log(i)[-2000:] for i in range(len(self.procs)))))

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


def environment(devices, **more):
  """This process's environment for a process of `devices` simulated CPU devices: the
  suite's other XLA flags kept (tests/conftest.py), `more` added."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(os.environ, JAX_PLATFORMS="cpu", **more, XLA_FLAGS=" ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"]))


def launch(args, folder, *, processes=1, devices=8, module="bitune_jax.cli.train",
           env_of=lambda i: {}):
  """`python -m module ARGS` as `processes` processes of `devices` CPU devices each
  (jax.distributed over localhost when more than one), process i with the environment
  variables `env_of(i)` added. Logs go to `folder`."""
  port = free_port()
  os.makedirs(folder, exist_ok=True)
  procs, logs = [], []
  for i in range(processes):
    env = environment(devices, PYTHONUNBUFFERED="1", **env_of(i))
    cmd = [sys.executable, "-m", module] + list(args)
    if processes > 1:
      cmd += [f"--coordinator_address=localhost:{port}",
              f"--num_processes={processes}", f"--process_id={i}"]
    logs.append(os.path.join(folder, f"process{i}.{time.time_ns()}.log"))
    with open(logs[-1], "w") as out:
      procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=env))
  return Run(procs, logs)


def scalars(workdir):
  """`{tag: {step: value}}` of the TensorBoard events in `workdir` (every launch; a
  step a later launch wrote again holds the later value)."""
  from bitune_jax.training import events  # pylint: disable=g-import-not-at-top
  return {tag: dict(values) for tag, values in events.read_scalars(workdir).items()}


def final_state(workdir, step):
  """The `step` checkpoint of `workdir` as host arrays, read with orbax alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # any writer's topology
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          meta)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))
