"""The shipped configs: `get_config(arg)` per method, and the papers' tables as specs
in `tables/`. The checkout's top-level `configs/` is this folder (a link), so
`configs/<method>.py:ARG` names the same file in a checkout, and `find` names it from
an installed wheel or any other working directory."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def find(path: str, *, folder: str = "") -> str:
  """`path` where it is a file; else the shipped file of its name in `folder` ("" or
  "tables": `configs/X.py`, `configs/tables/X.py`, or just `X`); else `path` as it is
  (for the caller's "no such file")."""
  if os.path.isfile(path):
    return path
  name = os.path.splitext(os.path.basename(path))[0]
  shipped = os.path.join(_HERE, folder, f"{name}.py")
  return shipped if os.path.isfile(shipped) and name != "__init__" else path
