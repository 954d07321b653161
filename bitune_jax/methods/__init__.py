"""The methods: one module each, ending with `METHOD = base.Method(...)`.

`base.Method` is everything the loop, the data and the evaluation know of a method;
`base.train_step` the one step they all run. A module of this package that defines
`METHOD` is a method (its name is `config.method`); adding one is that module and its
`configs/<name>.py`.
"""

import importlib
import pkgutil

from bitune_jax.methods import base


def discover():
  """`{name: Method}` of every module of this package that defines `METHOD`."""
  found = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
    if isinstance(method, base.Method):
      if method.name != info.name:
        raise ImportError(f"bitune_jax.methods.{info.name} declares the method "
                          f"{method.name!r}: a method is named after its module")
      found[method.name] = method
  return found


METHODS = discover()
# Vanilla fine-tuning: what the k-shot protocol trains, and what evaluates a
# pre-trained checkpoint as it is (the sweep's rows without a method).
VANILLA = "finetune"


def get(name):
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
  return METHODS[name]


def data_needs(config):
  """What `config.method` asks of the data (`Method.needs`)."""
  return get(config.method).needs(config)
