"""The library's surface for other JAX code: typed public functions, a py.typed
marker, docstrings that point only at what the package ships."""

import importlib
import inspect
import os
import pkgutil
import re

import bitune_jax
import bitune_jax.convert
import bitune_jax.data
from bitune_jax import class_kl, ema, evaluate, losses, queues, relationship

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_of(package):
  """`package` and every module under it (subpackages included), imported."""
  names = [package.__name__] + [
      info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
      if not info.name.endswith("__main__")]  # runs a command line when imported
  return [importlib.import_module(name) for name in names]


def test_public_functions_of_the_importable_modules_are_typed():
  missing = []
  modules = [losses, class_kl, queues, ema, evaluate, relationship,
             *_modules_of(bitune_jax.convert), *_modules_of(bitune_jax.data)]
  assert {"bitune_jax.convert.reader", "bitune_jax.data.datasets",
          "bitune_jax.data.builders.coco70"} <= {m.__name__ for m in modules}
  for module in modules:
    for name, fn in inspect.getmembers(module, inspect.isfunction):
      if name.startswith("_") or fn.__module__ != module.__name__:
        continue
      signature = inspect.signature(fn)
      untyped = [p for p, v in signature.parameters.items()
                 if v.annotation is inspect.Parameter.empty]
      if untyped or signature.return_annotation is inspect.Signature.empty:
        missing.append(f"{module.__name__}.{name} {untyped or 'return'}")
  assert missing == []
  assert os.path.exists(os.path.join(os.path.dirname(bitune_jax.__file__), "py.typed"))


def test_docstrings_point_at_nothing_outside_the_package():
  outside = re.compile(r"shared/|papers/|DESIGN\.md|STYLE\.md")
  found = []
  for info in pkgutil.walk_packages(bitune_jax.__path__, "bitune_jax."):
    if info.name.endswith("__main__"):  # runs a command line when imported
      continue
    module = importlib.import_module(info.name)
    for text in [module.__doc__ or ""] + [
        obj.__doc__ or "" for _, obj in inspect.getmembers(module)
        if (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", "") == info.name]:
      if outside.search(text):
        found.append(info.name)
  assert found == []
