"""What there is to run: `bitune-train --list` prints the methods, configs, datasets
and table specs, each on a line with what it is (from its docstring), read without
importing the modules (so the listing is quick)."""

import ast
import os
import re

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bitune_jax/


def _summary(path: str) -> str:
  """The first sentence of the module docstring of `path` ('' without one)."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  first = " ".join(doc.split("\n\n")[0].split())
  sentence = re.split(r"(?<!\bal)\. ", first)[0].rstrip(".")  # not at "et al. "
  return sentence if len(sentence) <= 100 else sentence[:97] + "..."


def _modules(folder: str) -> list[tuple[str, str]]:
  names = sorted(n[:-3] for n in os.listdir(folder)
                 if n.endswith(".py") and not n.startswith("_"))
  return [(n, _summary(os.path.join(folder, f"{n}.py"))) for n in names]


def _declares_a_method(path: str) -> bool:
  """Whether the module assigns `METHOD` (`bitune_jax.methods`' rule, read, not run)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  return any(isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "METHOD" for t in node.targets)
             for node in tree.body)


def _datasets() -> list[tuple[str, str]]:
  from bitune_jax.data import datasets  # pylint: disable=g-import-not-at-top
  rows = [("digits", "5 classes: the offline demo (scikit-learn's digits 5-9)")]
  for name, spec in datasets.SPECS.items():
    what = (f"{spec.num_classes} classes, tfds {spec.tfds_name}"
            f"{' (manual download)' if spec.manual else ''}")
    rows.append((name, what + (" (a replay source only)" if name == "imagenet" else "")))
  return rows


def groups() -> dict[str, list[tuple[str, str]]]:
  """`{group: [(name, description), ...]}`."""
  folder = os.path.join(_PACKAGE, "methods")
  methods = [(n, d) for n, d in _modules(folder)
             if _declares_a_method(os.path.join(folder, f"{n}.py"))]
  return {
      "methods (config.method)": methods,
      "configs (--config configs/NAME.py:ARG)": _modules(os.path.join(_PACKAGE, "configs")),
      "datasets (config.dataset)": _datasets(),
      "table specs (bitune-sweep --spec configs/tables/NAME.py)":
          _modules(os.path.join(_PACKAGE, "configs", "tables")),
  }


def text() -> str:
  lines = []
  for group, rows in groups().items():
    lines.append(f"{group}:")
    width = max(len(n) for n, _ in rows)
    lines += [f"  {n:<{width}}  {d}".rstrip() for n, d in rows]
    lines.append("")
  return "\n".join(lines)
