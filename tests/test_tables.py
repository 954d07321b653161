"""The papers' tables (`configs/tables/`): every spec loads, names a real dataset,
method and checkpoint, and every runnable row's config builds and validates; rows that
cannot run yet say why."""

import collections
import glob
import os

import pytest

from bitune_jax import methods
from bitune_jax.experiments import grid, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The sweep's `--checkpoint NAME=PATH` for every name a spec may ask for.
_ANY_CHECKPOINT = collections.defaultdict(lambda: "/checkpoints/converted.npz")
SPECS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "tables", "*.py"))
               if not p.endswith("__init__.py"))


def test_there_is_a_spec_per_table_of_the_papers():
  names = {os.path.basename(p)[:-3] for p in SPECS}
  expected = ({f"bituning_table{i}" for i in range(1, 7)}
              | {f"cotuning_table{i}" for i in (2, 3)}
              | {f"unsup_table{i}" for i in range(1, 7)})
  assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_every_row_builds_and_validates(path):
  table = tables.load(path)
  assert table.rows and table.columns
  for row in table.rows:
    # Each row of a paper's table carries the paper's numbers; a grid of our own, none.
    assert bool(row.numbers) == bool(table.paper), (table.name, row.label)
    for mean, std in row.numbers.values():
      assert 0 <= mean <= 100 and (std is None or 0 <= std < 20), (table.name, row.label)
  # A row that cannot run says why, and is no cell; every other row's runs build.
  assert all(row.missing.strip() for row in table.rows if row.missing)
  assert not any(cell.row.missing for cell in tables.cells(table))
  for cell in grid.cells_from_spec(table, [1], {}):
    run, = cell.runs
    config = grid.build_config(run, _ANY_CHECKPOINT)
    assert config.dataset == cell.dataset and config.seed == 1
    if run.arg != "demo":
      assert config.arch == run.arg.split(",")[1]
    assert config.method == (run.config or methods.VANILLA)
    for key, value in run.overrides:
      node = config
      for part in key.split("."):
        node = node[part]
      assert node == value, (table.name, cell.row, key)


def test_bituning_table5_rows_are_the_loss_ablations():
  table = tables.load(os.path.join(ROOT, "configs", "tables", "bituning_table5.py"))
  weights = {r.label: tuple(r.overrides[f"bituning.{t}_weight"] for t in ("ce", "cce",
                                                                          "ccl"))
             for r in table.rows}
  assert weights == {"CE": (1, 0, 0), "CE + CCE": (1, 1, 0), "CE + CCL": (1, 0, 1),
                     "CCE + CCL": (0, 1, 1), "CE + CCE + CCL": (1, 1, 1)}
  cell, = [c for c in grid.cells_from_spec(table, [0], {})
            if c.row == "CE + CCL" and c.x == 50]
  assert cell.paper == (60.77, 0.31)
  config = grid.build_config(cell.runs[0], _ANY_CHECKPOINT)
  assert (config.sampling_rate, config.bituning.cce_weight) == (50, 0.0)


def test_a_malformed_spec_is_refused(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from bitune_jax.configs.tables import Column, Row, Table\n"
                 "TABLE = Table('bi-tuning', 9, 't', 'm', (Column('A', 'nowhere'),), ())\n")
  with pytest.raises(ValueError, match="unknown dataset 'nowhere'"):
    tables.load(str(bad))
  bad.write_text("from bitune_jax.configs.tables import Column, Row, Table\n"
                 "TABLE = Table('bi-tuning', 9, 't', 'm', (Column('A', 'cub'),),\n"
                 "  (Row('r', 'bituning', 'resnet50', 'supervised_resnet50',\n"
                 "       {'B': (1.0, None)}),))\n")
  with pytest.raises(ValueError, match="numbers for no column"):
    tables.load(str(bad))
  with pytest.raises(ValueError, match="no table spec"):
    tables.load(str(tmp_path / "missing.py"))


def test_the_vit_grid_runs_the_vit_recipe_from_its_checkpoints():
  """configs/tables/vit.py: 8 rows x 9 columns; each run a ViT arch with the ViT recipe;
  Co-Tuning only from the supervised ViT-B/16, whose head is its source classifier."""
  table = tables.load("vit")
  cells = grid.cells_from_spec(table, [0], {})
  assert len(cells) == 8 * 9
  checkpoints = set()
  for cell in cells:
    run, = cell.runs
    config = grid.build_config(run, _ANY_CHECKPOINT)
    assert (config.optimizer, config.lr_mult.layer_decay, config.image_size) == (
        "adamw", 0.65, 224)
    checkpoints.add((run.config, run.checkpoint))
  assert {c for m, c in checkpoints if m == "cotuning"} == {"supervised_vit_b16"}
  assert {c for m, c in checkpoints if m == "bituning"} == {
      "dino_vit_b16", "clip_vit_b16", "dinov2_vit_b14"}
