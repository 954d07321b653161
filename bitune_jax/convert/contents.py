"""The state dict inside a checkpoint object: a flat dict of tensors, or one under
`state_dict` / `model`, and report lines for what else the object held."""

from typing import Any

import numpy as np

from bitune_jax.convert.reader import ForeignObject
from bitune_jax.convert.mapping import ConversionError


def find_state_dict(obj: Any) -> tuple[dict[str, np.ndarray], list[str]]:
  """`(state_dict, dropped)`: the tensors of a checkpoint object, and what else it held.

  Accepts a flat state_dict or a dict holding one under `state_dict` / `model` (the
  others, e.g. epoch, arch, optimizer, a pickled memory bank, are reported as dropped).
  """
  if isinstance(obj, ForeignObject):
    raise ConversionError(f"checkpoint holds a pickled {obj.qualname} object (a whole "
                          "model saved with torch.save(model)?), not a state_dict; save "
                          "its state_dict() instead")
  if not isinstance(obj, dict):
    raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
  for key, inner in [(None, obj), ("state_dict", obj.get("state_dict")),
                     ("model", obj.get("model"))]:
    if not (isinstance(inner, dict) and inner):
      continue
    foreign = [k for k, v in inner.items() if isinstance(v, ForeignObject)]
    if foreign and all(isinstance(v, (np.ndarray, ForeignObject)) for v in inner.values()):
      raise ConversionError(f"state_dict entry {foreign[0]!r} is a pickled "
                            f"{inner[foreign[0]].qualname} object, not a tensor")
    if all(isinstance(v, np.ndarray) for v in inner.values()):
      return inner, [_describe(k, v) for k, v in obj.items() if key and k != key]
  raise ConversionError(
      "no state_dict found: expected a dict of tensors, or one under 'state_dict' or "
      f"'model'; top-level keys: {sorted(map(str, obj))[:10]}")


def _describe(key, value):
  """A report line for a top-level checkpoint entry that is not converted."""
  if not isinstance(value, ForeignObject):
    return f"{key} (checkpoint metadata)"
  arrays = [f"{name} {list(v.shape)}" for name, v in _arrays(value.state, "") if v.size > 1]
  held = f": {', '.join(arrays[:4])}" if arrays else ""
  return (f"{key} (a pickled {value.qualname} object, read as data, never imported or "
          f"run{held})")


def _arrays(tree, name):
  """(name, array) of the arrays in a tree of dicts and ForeignObjects."""
  if isinstance(tree, np.ndarray):
    yield name, tree
  elif isinstance(tree, ForeignObject):
    yield from _arrays(tree.state, name)
  elif isinstance(tree, dict):
    for key, value in tree.items():
      yield from _arrays(value, str(key))
