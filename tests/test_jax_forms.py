"""Every public function of losses, queues and relationship in every JAX form.

One test id per (function, form), `<module>.<function>-<form>`:
  eager       the reference: computed op by op; finite; the same with NumPy inputs.
  jit_arg     `jax.jit`, every array argument traced (labels and integer arguments too).
  jit_closed  `jax.jit` with the labels / integer arguments closed over as constants
              (concrete, so checked as eagerly); for functions without them, every
              input but the differentiated one.
  vmap        `jax.vmap` over a leading axis of P = 3 problems (every input batched),
              against eager per problem; inside `jit`, one compile instead of one per op.
  grad        `jax.grad` of a fixed random projection of the output w.r.t. one float
              input, against a central finite difference of the eager function along a
              random unit direction (float32, eps 1e-3, the function jitted):
              |fd - ad| <= 1e-2 |grad| + 1e-3.
  jit_grad    `jax.jit(jax.grad(...))` against eager `jax.grad`.
Values against eager: within RTOL = 1e-6 of the largest |value| of each output (XLA
fuses differently from op-by-op dispatch; ~1e-7 measured); integer outputs exactly.

Host-side functions (NumPy out: relationship's public functions and
`queues.class_index_table`) refuse a traced argument (jit_arg, vmap, grad, jit_grad)
with a one-line TypeError saying they are host-side; jit_closed (everything closed
over) computes at trace time and equals eager.

Then the library's edges: labels as Python lists/tuples, out-of-range labels closed over
in jit, non-positive temperatures, and FixMatch's traced threshold.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import losses, queues, relationship

RTOL = 1e-6
P = 3  # problems stacked for vmap
B, D, C, K, F, N, CS = 6, 5, 3, 2, 4, 7, 4  # batch, dim, classes, slots, features, rows


def _unit(rng, *shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _labels(rng, n=B, num_classes=C, unlabelled=True):
  """`[n]` int32 in [-1, C) (with -1 "no label" when `unlabelled`), every class once."""
  low = -1 if unlabelled else 0
  labels = np.concatenate([np.arange(num_classes), rng.integers(low, num_classes,
                                                                n - num_classes)])
  return rng.permutation(labels).astype(np.int32)


def _key(rng):
  return np.asarray(jax.random.key_data(jax.random.key(int(rng.integers(2**31)))))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # "<module>.<function>"
  fn: Callable[..., Any]
  make: Callable[[np.random.Generator], dict]  # keyword inputs, NumPy (or pytrees)
  static: dict = dataclasses.field(default_factory=dict)  # non-array keywords
  wrt: Optional[str] = None  # float input of grad / jit_grad; None: not differentiable
  closed: tuple = ()  # inputs closed over in jit_closed; () -> every input but `wrt`
  host: bool = False  # NumPy out: refuses traced arguments

  def closed_names(self, inputs):
    if self.host:
      return tuple(inputs)
    names = self.closed or tuple(k for k in inputs if k != self.wrt)
    return names or tuple(inputs)


def _cce_inputs(rng):
  return dict(h_query=rng.standard_normal((B, F)).astype(np.float32),
              head_kernel=rng.standard_normal((F, C)).astype(np.float32),
              head_bias=rng.standard_normal(C).astype(np.float32),
              queue_h=_unit(rng, C, K, F + 1), labels=_labels(rng))


def _sample_inputs(rng):
  # A fixed multiset of classes (counts 3, 2, 2): the table has one shape for vmap.
  labels = rng.permutation(np.repeat(np.arange(C), [3, 2, 2]))
  table, counts = queues.class_index_table(labels, num_rows=C)
  return dict(keys=_unit(rng, N, D), table=table, counts=counts, rng=_key(rng))


def _reverse_inputs(rng):
  return dict(train_probs=_softmax(2 * rng.standard_normal((N, CS))),
              train_labels=_labels(rng, N, unlabelled=False),
              val_probs=_softmax(2 * rng.standard_normal((N, CS))),
              val_labels=_labels(rng, N, unlabelled=False))


CASES = [
    # ------------------------------------------------------------------ losses
    Case("losses.l2_normalize", losses.l2_normalize,
         lambda r: dict(x=r.standard_normal((B, D)).astype(np.float32)), wrt="x"),
    Case("losses.append_one_and_normalize", losses.append_one_and_normalize,
         lambda r: dict(h=r.standard_normal((B, F)).astype(np.float32)), wrt="h"),
    Case("losses.check_labels", losses.check_labels, lambda r: dict(labels=_labels(r)),
         static=dict(fn="check", batch=B, num_classes=C)),
    Case("losses.categorical_contrastive_loss", losses.categorical_contrastive_loss,
         lambda r: dict(z_query=_unit(r, B, D), z_key=_unit(r, B, D),
                        queue_z=_unit(r, C, K, D), labels=_labels(r)),
         static=dict(temperature=0.07), wrt="z_query", closed=("labels",)),
    Case("losses.contrastive_cross_entropy_loss", losses.contrastive_cross_entropy_loss,
         _cce_inputs, static=dict(temperature=0.07), wrt="h_query", closed=("labels",)),
    Case("losses.info_nce_loss", losses.info_nce_loss,
         lambda r: dict(query=_unit(r, B, D), key=_unit(r, B, D), queue=_unit(r, N, D)),
         wrt="query"),
    Case("losses.mixed_info_nce_loss", losses.mixed_info_nce_loss,
         lambda r: dict(query=_unit(r, B, D), key_a=_unit(r, B, D), key_b=_unit(r, B, D),
                        lam=r.uniform(size=B).astype(np.float32), queue=_unit(r, N, D)),
         wrt="query"),
    Case("losses.co_tuning_loss", losses.co_tuning_loss,
         lambda r: dict(source_logits=r.standard_normal((B, CS)).astype(np.float32),
                        relationship_targets=_softmax(r.standard_normal((B, CS)))),
         wrt="source_logits"),
    Case("losses.cross_entropy_loss", losses.cross_entropy_loss,
         lambda r: dict(logits=r.standard_normal((B, C)).astype(np.float32),
                        labels=_labels(r)), wrt="logits", closed=("labels",)),
    Case("losses.fixmatch_loss", losses.fixmatch_loss,  # threshold: an array input
         lambda r: dict(logits_weak=3 * r.standard_normal((B, C)).astype(np.float32),
                        logits_strong=r.standard_normal((B, C)).astype(np.float32),
                        threshold=np.float32(r.uniform(0.4, 0.8)),
                        valid=r.uniform(size=B) < 0.8),
         wrt="logits_strong", closed=("threshold", "valid")),
    # ------------------------------------------------------------------ queues
    Case("queues.init_class_queues", queues.init_class_queues,
         lambda r: dict(rng=_key(r)), static=dict(num_classes=C, size=K, dim=D)),
    Case("queues.class_write_positions", queues.class_write_positions,
         lambda r: dict(ptr=r.integers(0, K, C).astype(np.int32), labels=_labels(r),
                        valid=r.uniform(size=B) < 0.8), static=dict(size=K)),
    Case("queues.enqueue_by_class", queues.enqueue_by_class,
         lambda r: dict(queues=queues.ClassQueues(
             keys=_unit(r, C, K, D), ptr=r.integers(0, K, C).astype(np.int32)),
                        keys=_unit(r, B, D), labels=_labels(r)),
         wrt="keys", closed=("labels",)),
    Case("queues.init_fifo_queue", queues.init_fifo_queue,
         lambda r: dict(rng=_key(r)), static=dict(size=N, dim=D)),
    Case("queues.enqueue_fifo", queues.enqueue_fifo,
         lambda r: dict(queue=queues.FifoQueue(keys=_unit(r, N, D),
                                               ptr=np.int32(r.integers(N))),
                        keys=_unit(r, B, D)), wrt="keys"),
    Case("queues.init_memory_bank", queues.init_memory_bank,
         lambda r: dict(rng=_key(r)), static=dict(size=N, dim=D)),
    Case("queues.update_memory_bank", queues.update_memory_bank,
         lambda r: dict(bank=queues.MemoryBank(keys=_unit(r, N, D)),
                        indices=r.integers(0, N, B).astype(np.int32),  # repeats too
                        values=_unit(r, B, D)),
         static=dict(momentum=0.5), wrt="values", closed=("indices",)),
    Case("queues.class_index_table", queues.class_index_table,
         lambda r: dict(labels=_labels(r, N)), static=dict(num_rows=C), host=True),
    Case("queues.sample_class_keys", queues.sample_class_keys, _sample_inputs,
         static=dict(size=K), wrt="keys", closed=("table", "counts", "rng")),
    # ------------------------------------------------------------------ relationship
    Case("relationship.probs_from_logits", relationship.probs_from_logits,
         lambda r: dict(logits=r.standard_normal((N, CS)).astype(np.float32)),
         static=dict(temperature=1.5), wrt="logits", host=True),
    Case("relationship.direct_relationship", relationship.direct_relationship,
         lambda r: dict(source_probs=_softmax(r.standard_normal((N, CS))),
                        labels=_labels(r, N, unlabelled=False)),
         static=dict(num_classes=C), wrt="source_probs", host=True),
    Case("relationship.calibrate_temperature", relationship.calibrate_temperature,
         lambda r: dict(logits=r.standard_normal((N, C)).astype(np.float32),
                        labels=_labels(r, N, unlabelled=False)),
         wrt="logits", host=True),
    Case("relationship.fit_logistic_regression", relationship.fit_logistic_regression,
         lambda r: dict(features=_softmax(r.standard_normal((N, CS))),
                        labels=_labels(r, N, unlabelled=False)),
         static=dict(num_classes=C, l2=1.0), wrt="features", host=True),
    Case("relationship.reverse_relationship", relationship.reverse_relationship,
         _reverse_inputs, static=dict(num_classes=C, l2_grid=(0.1, 1.0)),
         wrt="train_probs", host=True),
]
_BY_NAME = {case.name: case for case in CASES}


def _forms(case):
  forms = ["eager", "jit_arg", "jit_closed", "vmap"]
  return forms + (["grad", "jit_grad"] if case.wrt else [])


# --------------------------------------------------------------------------- helpers
def _jnp(tree):
  return jax.tree.map(jnp.asarray, tree)


def _call(case, inputs):
  return case.fn(**inputs, **case.static)


def _assert_same(actual, expected, rtol=RTOL):
  """Same pytree; float leaves within `rtol` of their largest |value|, others exact."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape
    if np.issubdtype(e.dtype, np.floating):
      scale = float(np.max(np.abs(e), initial=0.0))
      np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)
    else:
      np.testing.assert_array_equal(a, e)


def _projection(case, inputs, rng):
  """`x -> sum_leaves <weights, float output leaf>` with `x` in place of `case.wrt`."""
  out = _call(case, inputs)
  weights = [rng.standard_normal(np.shape(leaf)).astype(np.float32)
             for leaf in jax.tree.leaves(out)]

  def scalar(x):
    leaves = jax.tree.leaves(_call(case, {**inputs, case.wrt: x}))
    return sum(jnp.sum(jnp.asarray(leaf, jnp.float32) * w)
               for leaf, w in zip(leaves, weights)
               if jnp.issubdtype(jnp.result_type(leaf), jnp.floating))
  return scalar


def _run_form(case, form, inputs, rng):
  """The output of `case` in `form` (for vmap: of P problems, `inputs` the first)."""
  args = _jnp(inputs)
  if form == "eager":
    return _call(case, args)
  if form == "jit_arg":
    return jax.jit(lambda a: _call(case, a))(args)
  if form == "jit_closed":
    names = case.closed_names(inputs)
    closed = {k: v for k, v in args.items() if k in names}
    traced = {k: v for k, v in args.items() if k not in names}
    return jax.jit(lambda a: _call(case, {**a, **closed}))(traced)
  if form == "vmap":
    problems = [args] + [_jnp(case.make(rng)) for _ in range(P - 1)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
    return jax.jit(jax.vmap(lambda a: _call(case, a)))(stacked), problems
  scalar = _projection(case, args, rng)
  grad = jax.grad(scalar) if form == "grad" else jax.jit(jax.grad(scalar))
  return grad(args[case.wrt]), scalar


# --------------------------------------------------------------------------- forms
@pytest.mark.parametrize("name, form", [
    pytest.param(case.name, form, id=f"{case.name}-{form}")
    for case in CASES if not case.host for form in _forms(case)])
def test_form_matches_eager(name, form, rng):
  case = _BY_NAME[name]
  inputs = case.make(rng)
  expected = _call(case, _jnp(inputs))
  if form == "eager":
    for leaf in jax.tree.leaves(expected):
      assert np.all(np.isfinite(np.asarray(leaf)))
    numpy_in = {k: v if isinstance(v, np.ndarray) else _jnp(v) for k, v in inputs.items()}
    _assert_same(_call(case, numpy_in), expected)  # NumPy array inputs: the same
  elif form in ("jit_arg", "jit_closed"):
    _assert_same(_run_form(case, form, inputs, rng), expected)
  elif form == "vmap":
    got, problems = _run_form(case, form, inputs, rng)
    each = [_call(case, p) for p in problems]
    _assert_same(got, jax.tree.map(lambda *xs: np.stack(xs), *each))
  elif form == "grad":
    grad, scalar = _run_form(case, form, inputs, rng)
    x = jnp.asarray(inputs[case.wrt])
    d = rng.standard_normal(x.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    eps, value = 1e-3, jax.jit(scalar)  # jit == eager: the jit_arg form
    fd = (float(value(x + eps * d)) - float(value(x - eps * d))) / (2 * eps)
    ad = float(jnp.vdot(grad, d))
    assert abs(fd - ad) <= 1e-2 * float(jnp.linalg.norm(grad)) + 1e-3, (fd, ad)
  else:  # jit_grad
    grad, scalar = _run_form(case, form, inputs, rng)
    _assert_same(grad, jax.grad(scalar)(jnp.asarray(inputs[case.wrt])))


@pytest.mark.parametrize("name, form", [
    pytest.param(case.name, form, id=f"{case.name}-{form}")
    for case in CASES if case.host for form in _forms(case)])
def test_host_side_function(name, form, rng):
  """Eagerly and with everything closed over in jit: computed; traced: refused."""
  case = _BY_NAME[name]
  inputs = case.make(rng)
  if form in ("eager", "jit_closed"):
    _assert_same(_run_form(case, form, inputs, rng), _call(case, inputs))
    return
  args = _jnp(inputs)
  first = lambda out: jnp.asarray(jax.tree.leaves(out)[0], jnp.float32)
  scalar = lambda x: jnp.sum(first(_call(case, {**args, case.wrt: x})))
  run = {"jit_arg": lambda: jax.jit(lambda a: _call(case, a))(args),
         "vmap": lambda: jax.vmap(lambda a: _call(case, a))(
             jax.tree.map(lambda *xs: jnp.stack(xs), *[args] * P)),
         "grad": lambda: jax.grad(scalar)(args[case.wrt]),
         "jit_grad": lambda: jax.jit(jax.grad(scalar))(args[case.wrt])}[form]
  function = name.split(".")[1]
  with pytest.raises(TypeError, match=f"^{function}: a host-side function") as info:
    run()
  ours = str(info.value).split("\n-----")[0]  # under jit JAX appends a note
  assert "\n" not in ours and "got a traced `" in ours


@pytest.mark.parametrize("form", ["eager", "jit_closed"])
def test_inplace_update_compiler_options(form):
  """Not an array function (a backend name in, a dict out): the same inside a trace."""
  expected = {"xla_cpu_copy_insertion_use_region_analysis": True}
  assert queues.inplace_update_compiler_options("cpu") == expected
  assert queues.inplace_update_compiler_options("gpu") == {}
  if form == "jit_closed":
    seen = []
    jax.jit(lambda x: seen.append(queues.inplace_update_compiler_options("cpu"))
            or x)(1.0)
    assert seen == [expected]


# --------------------------------------------------------------------------- labels
_LABEL_ARGS = {case.name: [k for k in ("labels", "indices", "train_labels", "val_labels")
                           if k in case.make(np.random.default_rng(0))]
               for case in CASES}
_TAKES_LABELS = [name for name, keys in _LABEL_ARGS.items() if keys]
_CHECKS_RANGE = ["losses.check_labels", "losses.categorical_contrastive_loss",
                 "losses.contrastive_cross_entropy_loss", "losses.cross_entropy_loss",
                 "queues.enqueue_by_class"]


@pytest.mark.parametrize("kind", [list, tuple])
@pytest.mark.parametrize("name", _TAKES_LABELS)
def test_labels_as_python_sequence(name, kind, rng):
  """A list or tuple of Python ints works as the array does, eagerly and (array
  functions) closed over in jit."""
  case = _BY_NAME[name]
  inputs = case.make(rng)
  expected = _call(case, _jnp(inputs))
  as_seq = {k: kind(int(v) for v in inputs[k]) for k in _LABEL_ARGS[name]}
  _assert_same(_call(case, {**_jnp(inputs), **as_seq}), expected)
  if not case.host:
    traced = {k: v for k, v in _jnp(inputs).items() if k not in as_seq}
    got = jax.jit(lambda a: _call(case, {**a, **as_seq}))(traced)
    _assert_same(got, expected)


@pytest.mark.parametrize("form", ["eager", "jit_closed_array", "jit_closed_list"])
@pytest.mark.parametrize("name", _CHECKS_RANGE)
def test_label_out_of_range_refused_when_concrete(name, form, rng):
  """The regression: labels closed over by a jitted function are concrete and checked
  (`int(jnp.max(labels))` used to stage an op there: ConcretizationTypeError)."""
  case = _BY_NAME[name]
  inputs = _jnp(case.make(rng))
  bad = inputs["labels"].at[1].set(99)
  if form == "jit_closed_list":
    bad = [int(v) for v in bad]
  function = case.static.get("fn", name.split(".")[1])
  with pytest.raises(ValueError, match=f"^{function}: labels must be < C=.*got 99\\b"):
    if form == "eager":
      _call(case, {**inputs, "labels": bad})
    else:
      rest = {k: v for k, v in inputs.items() if k != "labels"}
      jax.jit(lambda a: _call(case, {**a, "labels": bad}))(rest)


@pytest.mark.parametrize("name", ["losses.categorical_contrastive_loss",
                                  "losses.contrastive_cross_entropy_loss",
                                  "losses.cross_entropy_loss"])
def test_label_out_of_range_traced_is_nan(name, rng):
  case = _BY_NAME[name]
  inputs = _jnp(case.make(rng))
  inputs["labels"] = inputs["labels"].at[1].set(99)
  assert np.isnan(jax.jit(lambda a: _call(case, a))(inputs))


# --------------------------------------------------------------------------- temperature
_TEMPERATURE = ["losses.categorical_contrastive_loss",
                "losses.contrastive_cross_entropy_loss", "losses.info_nce_loss",
                "losses.mixed_info_nce_loss"]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("name", _TEMPERATURE)
def test_non_positive_temperature_refused(name, value, rng):
  """Refused when concrete: a Python float eagerly, an array closed over in jit."""
  case = _BY_NAME[name]
  inputs = _jnp(case.make(rng))
  function = name.split(".")[1]
  message = f"^{function}: temperature must be > 0, got {value}\\b"
  with pytest.raises(ValueError, match=message):
    case.fn(**inputs, temperature=value)
  closed = jnp.float32(value)  # made outside the trace: a concrete constant
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda a: case.fn(**a, temperature=closed))(inputs)


@pytest.mark.parametrize("name", _TEMPERATURE)
def test_traced_temperature(name, rng):
  """A traced temperature is not checked; jit and grad through it match eager."""
  case = _BY_NAME[name]
  inputs = _jnp(case.make(rng))
  loss = lambda t: case.fn(**inputs, temperature=t)
  _assert_same(jax.jit(loss)(jnp.float32(0.1)), loss(0.1))
  _assert_same(jax.jit(jax.grad(loss))(jnp.float32(0.1)), jax.grad(loss)(0.1))


# --------------------------------------------------------------------------- fixmatch
def test_fixmatch_traced_threshold(rng):
  """The threshold as a jit argument and as the variable of grad (a step function:
  gradient 0); grad w.r.t. the strong logits with the threshold traced."""
  inputs = _jnp(_BY_NAME["losses.fixmatch_loss"].make(rng))
  del inputs["threshold"]
  loss = lambda t, s: losses.fixmatch_loss(**{**inputs, "logits_strong": s},
                                           threshold=t)[0]
  strong = inputs["logits_strong"]
  for t in (0.0, 0.5, 0.9, 1.0):
    _assert_same(jax.jit(losses.fixmatch_loss)(**inputs, threshold=jnp.float32(t)),
                 losses.fixmatch_loss(**inputs, threshold=t))
    assert float(jax.grad(loss)(jnp.float32(t), strong)) == 0.0
    _assert_same(jax.jit(jax.grad(loss, argnums=1))(jnp.float32(t), strong),
                 jax.grad(loss, argnums=1)(t, strong))


@pytest.mark.parametrize("value", [-0.5, 1.5, float("nan")])
def test_fixmatch_threshold_out_of_range_refused_when_concrete(value, rng):
  inputs = _jnp(_BY_NAME["losses.fixmatch_loss"].make(rng))
  del inputs["threshold"]
  message = f"^fixmatch_loss: threshold must be in \\[0, 1\\], got {value}\\b"
  with pytest.raises(ValueError, match=message):
    losses.fixmatch_loss(**inputs, threshold=value)
  closed = jnp.float32(value)  # made outside the trace: a concrete constant
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda a: losses.fixmatch_loss(**a, threshold=closed))(inputs)
