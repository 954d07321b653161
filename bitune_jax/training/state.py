"""A run's train state at its start: restored from the workdir's own checkpoint, else
initialised (the method's `init_state`) with the pre-trained backbone of
`config.init_from` loaded into it, then prepared (`Method.prepare`)."""

import functools
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import convert, sharding
from bitune_jax.methods import base

log = logging.getLogger("bitune_jax")

# `init_from` values that name a checkpoint made on demand, not a file: name ->
# `(config, workdir) -> path` (the digits demo's source model: `experiments.demo`).
Sources = Mapping[str, Callable[..., str]]


def load_pretrained(config, workdir, sources: Sources = None):
  """The converted checkpoint named by `config.init_from` (None if empty or 'none'),
  with its `path` and `sha256`."""
  if not config.init_from or config.init_from == "none":
    if not config.init_from and config.dataset != "digits":
      log.warning("no init_from: %s starts from RANDOM weights on %s. Give a "
                  "bitune-convert output (--config.init_from=FILE.npz), or "
                  "--config.init_from=none to say that this is meant.", config.method,
                  config.dataset)
    return None
  path = config.init_from
  if path in (sources or {}):
    path = sources[path](config, workdir)
  elif path.startswith("demo:"):
    raise ValueError(f"init_from {path!r} is made by the digits demo: run it with "
                     "bitune-train (or bitune_jax.experiments.demo.train_and_evaluate)")
  pretrained = convert.load_converted(path)
  if pretrained["report"]["arch"] != config.arch:
    raise ValueError(f"init_from {path} is a {pretrained['report']['arch']} checkpoint; "
                     f"the config's arch is {config.arch}")
  pretrained["path"], pretrained["sha256"] = path, convert.sha256_of(path)
  return pretrained


def with_pretrained(state, pretrained, shardings, keeps):
  """Copies the pretrained backbone into the query (and key) encoders, and what else
  the method `keeps` of it (Co-Tuning: the pre-trained classifier, "source_head")."""
  params = dict(state.params, backbone=pretrained["backbone"]["params"])
  for part in keeps:
    if part != "backbone":
      params[part] = pretrained[part]
  stats = dict(state.batch_stats, backbone=pretrained["backbone"]["batch_stats"])
  new = state.replace(params=params, batch_stats=stats)
  if state.key_params:  # the key encoder starts as a copy (its own buffers: donated)
    new = new.replace(key_params=jax.tree.map(np.array, params),
                      key_batch_stats=jax.tree.map(np.array, stats))
  if jax.process_count() > 1:  # every process read the same file: checked on its hash
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      multihost_utils.assert_equal(
          np.frombuffer(bytes.fromhex(pretrained["sha256"]), np.uint8))
    except AssertionError:
      raise ValueError(f"init_from {pretrained['path']} is not the same file on every "
                       "process (their sha256 differ)") from None
  try:
    return sharding.put_same_on_every_process(new, shardings)
  except ValueError as e:
    raise ValueError(f"pretrained backbone does not fit the model: {e}") from None


def create_state(config, method, model, tx, mesh, data, workdir, ckpts, sources=None):
  """`(state, shardings)`: the workdir's checkpoint if it has one, else step 0."""
  sample = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
  init = functools.partial(base.init_state, method, sample_images=sample, model=model,
                           tx=tx, config=config, data=data)
  # Parameters are replicated, so partitioning their random draws gains nothing, and
  # partitionable threefry makes the init compile ~4x slower (19 s vs 5 s for the demo).
  # Both traces (shapes, then values) under the same setting: one init, any process.
  with jax.threefry_partitionable(False):
    abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = base.state_shardings(method, abstract, mesh, config)
  restored = None if ckpts is None else ckpts.restore(abstract, shardings)
  if restored is not None:
    log.info("resumed from %s at step %d", ckpts.directory, int(restored.step))
    return restored, shardings
  pretrained = load_pretrained(config, workdir, sources)
  method.check_pretrained(pretrained, config)  # before anything compiles
  with jax.threefry_partitionable(False):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  if pretrained is not None:
    state = with_pretrained(state, pretrained, shardings, method.keeps)
    log.info("initialised the backbone from %s", config.init_from)
  # e.g. Co-Tuning's relationship, from the data; the starting point of L2-SP, DELTA
  state = method.prepare(state, model=model, config=config, data=data, mesh=mesh,
                         workdir=workdir, pretrained=pretrained)
  return sharding.put_same_on_every_process(state, shardings), shardings
