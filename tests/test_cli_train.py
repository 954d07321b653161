"""`bitune-train` as a user types it, in this process (no imports to pay for again):
values and paths that cannot work are refused in one line, exit code 2, before
anything compiles or is written."""

import os
import sys

import pytest
from absl import flags

from bitune_jax.cli import train as train_cli
from bitune_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = f"--config={ROOT}/configs/finetune.py:demo"


def _train_cli(monkeypatch, capsys, *argv):
  """`bitune-train ARGV...` -> (exit code, stdout, stderr)."""
  flags.FLAGS.unparse_flags()  # a fresh command line: nothing kept from the last one
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the overrides' flags, defined by each parse anew
  monkeypatch.setattr(sys, "argv", ["bitune-train", *argv])
  with pytest.raises(SystemExit) as exited:
    train_cli.run()
  out = capsys.readouterr()
  return exited.value.code or 0, out.out, out.err


def _refused(monkeypatch, capsys, *argv):
  """The one line of a refusal (exit code 2, no traceback)."""
  code, _, err = _train_cli(monkeypatch, capsys, *argv)
  assert code == 2 and "Traceback" not in err, err[-2000:]
  assert len(err.strip().splitlines()) == 1, err
  return err.strip()


@pytest.mark.parametrize("field,value,rule,more", [
    ("eval_every", 0, "an integer >= 1", ()),
    ("log_every", 0, "an integer >= 1", ()),
    ("checkpoint_every", 0, "an integer >= 1", ()),
    ("eval_batch_size", 0, "an integer >= 1", ()),
    ("image_size", 0, "an integer >= 4 (resnet_small's total stride)", ()),
    ("image_size", 16, "an integer >= 32 (resnet18's total stride)",
     ("--config.arch=resnet18",)),
])
def test_a_zero_that_would_crash_late_is_refused_first(tmp_path, monkeypatch, capsys,
                                                        field, value, rule, more):
  workdir = tmp_path / "run"
  def compiled(*args, **kwargs):
    raise AssertionError("the run got as far as setup")
  monkeypatch.setattr(loop, "setup", compiled)
  line = _refused(monkeypatch, capsys, DEMO, f"--workdir={workdir}",
                  f"--config.{field}={value}", *more)
  assert line == (f"bitune-train: error: {field} must be {rule}, got {value}: it "
                  "cannot train")
  assert os.listdir(tmp_path) == []


def test_another_methods_field_is_refused_naming_its_method(tmp_path):
  """`bitune-train` as a process: vanilla fine-tuning's config has no Bi-tuning
  section, so an override of a Bi-tuning field (which it would never read) is refused
  in one line naming the method that reads it, before anything is written."""
  import subprocess  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-m", "bitune_jax.cli.train", "--config", "configs/finetune.py:demo",
       "--workdir", str(workdir), "--config.bituning.temperature=0"],
      capture_output=True, text=True, check=False, cwd=ROOT)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
  assert run.stderr.splitlines() == [
      "bitune-train: error: config field 'bituning.temperature' belongs to bituning "
      "(configs/bituning.py); this config is finetune's, which has no 'bituning' section"]
  assert os.listdir(tmp_path) == []


def test_a_config_has_the_sections_of_its_method(tmp_path, monkeypatch, capsys):
  """Each config carries its method's section alone (`config_base.sections`); another
  method's field or section is refused naming whose it is, a misspelt field of its own
  still gets its suggestion; nothing compiles, nothing is written."""
  from bitune_jax.configs import bituning, finetune  # pylint: disable=g-import-not-at-top
  sections = {"bituning", "cotuning", "unsup"}
  assert not sections & set(finetune.get_config("demo").keys())
  assert sections & set(bituning.get_config("demo").keys()) == {"bituning"}
  def compiled(*args, **kwargs):
    raise AssertionError("the run got as far as setup")
  monkeypatch.setattr(loop, "setup", compiled)
  workdir = f"--workdir={tmp_path}/run"
  bituning_demo = f"--config={ROOT}/configs/bituning.py:demo"
  for argv, said in (
      ((DEMO, "--noconfig.bituning.ema_cosine"),
       "config field 'bituning.ema_cosine' belongs to bituning (configs/bituning.py); "
       "this config is finetune's, which has no 'bituning' section"),
      ((bituning_demo, "--config.unsup.replay_fraction=0"),
       "config field 'unsup.replay_fraction' belongs to unsup_finetune "
       "(configs/unsup_finetune.py); this config is bituning's, which has no 'unsup' "
       "section"),
      ((DEMO, "--config.cotuning.relationship=direct"),
       "config field 'cotuning.relationship' belongs to cotuning (configs/cotuning.py); "
       "this config is finetune's, which has no 'cotuning' section"),
      ((bituning_demo, "--config.bituning.temprature=0"),
       "unknown config field 'temprature' (did you mean 'temperature'?)"),
      ((DEMO, "--config.totl_steps=3"),
       "unknown config field 'totl_steps' (did you mean 'total_steps'?)"),
      ((DEMO, "--config.method=bituning"),
       "a bituning config needs its 'bituning' section: start from configs/bituning.py")):
    assert _refused(monkeypatch, capsys, *argv, workdir) == f"bitune-train: error: {said}"
  assert os.listdir(tmp_path) == []


def test_a_workdir_that_cannot_be_one_is_refused(tmp_path, monkeypatch, capsys):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  assert _refused(monkeypatch, capsys, DEMO, f"--workdir={a_file}") == (
      f"bitune-train: error: workdir {a_file} is a file, not a folder: give another "
      "--workdir")
  assert _refused(monkeypatch, capsys, DEMO, f"--workdir={a_file}/run/1") == (
      f"bitune-train: error: workdir {a_file}/run/1 would be under {a_file}, which is a "
      "file: give another --workdir")
  locked = tmp_path / "locked"
  locked.mkdir()
  # (as root every folder is writable: the check is os.access, asked for `locked` here)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: (
      False if os.fspath(p) == str(locked) else real_access(p, mode)))
  assert _refused(monkeypatch, capsys, DEMO, f"--workdir={locked}/run") == (
      f"bitune-train: error: workdir {locked}/run: cannot write in {locked} (permission "
      "denied); give a --workdir you can write to")
  assert sorted(os.listdir(tmp_path)) == ["locked", "notes.txt"]
  assert os.listdir(locked) == [] and a_file.read_text() == "mine"


def test_a_misspelt_config_path_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert _refused(monkeypatch, capsys, "--config=configs/finetun.py:demo",
                  "--workdir=run") == (
      "bitune-train: error: --config configs/finetun.py: no such file; give a config "
      "file and its argument, e.g. configs/bituning.py:demo")
  code, _, err = _train_cli(monkeypatch, capsys, f"{DEMO[:-5]}:dem", "--workdir=run")
  assert code == 2 and "Traceback" not in err, err
  assert err.splitlines()[0] == (
      f"bitune-train: error: flag --config={ROOT}/configs/finetune.py:dem: config "
      "argument must be 'demo', 'vit_demo' or 'dataset,arch,rate' (e.g. 'cub,resnet50,25'), got "
      "'dem'")
  assert os.listdir(tmp_path) == []


def test_home_and_variables_in_paths_are_expanded(tmp_path, monkeypatch, capsys):
  """The README's `--config.data.data_dir=~/tensorflow_datasets`: the shell leaves `~`
  after `=` as it is; the run must not make a folder named `~`."""
  home, here = tmp_path / "home", tmp_path / "here"
  home.mkdir()
  here.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("RELS", str(tmp_path / "rels"))
  monkeypatch.chdir(here)
  seen = {}
  def setup(config, mesh, workdir=None, ckpts=None, sources=None):
    del mesh, ckpts, sources
    seen["config"], seen["workdir"] = config, workdir
    raise ValueError("stopped before anything compiles")
  monkeypatch.setattr(loop, "setup", setup)
  assert _refused(
      monkeypatch, capsys, f"--config={ROOT}/configs/cotuning.py:demo", "--workdir=~/runs/a",
      "--config.data.data_dir=~/tensorflow_datasets", "--config.data.manual_dir=~/manual",
      "--config.data.cache_dir=$HOME/cache", "--config.data.replay_manual_dir=~/imagenet",
      "--config.init_from=~/resnet50.npz",
      "--config.cotuning.relationship_file=${RELS}/r.npy") == (
          "bitune-train: error: stopped before anything compiles")
  config = seen["config"]
  assert seen["workdir"] == f"{home}/runs/a"
  assert (config.data.data_dir, config.data.manual_dir, config.data.cache_dir,
          config.data.replay_manual_dir, config.init_from,
          config.cotuning.relationship_file) == (
              f"{home}/tensorflow_datasets", f"{home}/manual", f"{home}/cache",
              f"{home}/imagenet", f"{home}/resnet50.npz", f"{tmp_path}/rels/r.npy")
  assert os.listdir(here) == [] and os.listdir(home) == []  # the failed start: removed


def test_every_path_field_of_every_config_is_expanded():
  """A path field added later must join `PATH_FIELDS`: every string field named like a
  path, in every shipped config."""
  import importlib  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  from bitune_jax.methods import METHODS  # pylint: disable=g-import-not-at-top
  named = set()
  for method in METHODS:
    config = importlib.import_module(f"bitune_jax.configs.{method}").get_config("demo")
    flat = {}
    for key, value in config.items():
      if hasattr(value, "items"):
        flat.update({f"{key}.{k}": v for k, v in value.items()})
      else:
        flat[key] = value
    named |= {k for k, v in flat.items() if isinstance(v, str) and k.endswith(
        ("_dir", "_file", "_path", "init_from"))}
  assert named == set(config_base.PATH_FIELDS)


# ----------------------------------------------------------------- the smaller things
def test_every_tool_says_its_version(monkeypatch, capsys):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  from bitune_jax.cli import eval as eval_cli, export as export_cli  # pylint: disable=g-import-not-at-top
  from bitune_jax.cli import sweep as sweep_cli  # pylint: disable=g-import-not-at-top
  from bitune_jax.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  version = importlib.metadata.version("bitune-jax")
  assert _train_cli(monkeypatch, capsys, "--version") == (0, f"bitune-train {version}\n",
                                                          "")
  for name, tool in (("bitune-eval", eval_cli.main), ("bitune-export", export_cli.main),
                     ("bitune-sweep", sweep_cli.main), ("bitune-convert", convert_cli.main)):
    with pytest.raises(SystemExit) as exited:
      tool(["--version"])
    assert exited.value.code == 0, name
    assert capsys.readouterr().out == f"{name} {version}\n"


def test_list_names_methods_configs_datasets_and_table_specs(monkeypatch, capsys):
  from bitune_jax import methods  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  code, out, _ = _train_cli(monkeypatch, capsys, "--list")
  assert code == 0
  groups, rows = {}, None
  for line in out.splitlines():
    if line and not line.startswith(" "):
      rows = groups.setdefault(line.split(" ")[0], {})
    elif line:
      name, _, what = line.strip().partition(" ")
      rows[name] = what.strip()
  assert list(groups) == ["methods", "configs", "datasets", "table"]
  assert set(groups["methods"]) == set(methods.METHODS) == set(groups["configs"])
  assert set(groups["datasets"]) == set(config_base.DATASETS) | {"imagenet"}
  tables = {n[:-3] for n in os.listdir(os.path.join(ROOT, "configs", "tables"))
            if n.endswith(".py") and not n.startswith("_")}
  assert set(groups["table"]) == tables
  assert groups["methods"]["finetune"] == (
      "Vanilla fine-tuning: cross-entropy on a new head; the baseline of every comparison")
  assert groups["configs"]["bss"].endswith("(Chen et al. 2019)")  # not cut at "al."
  assert groups["datasets"]["cub"] == "200 classes, tfds caltech_birds2011"
  assert groups["table"]["bituning_table1"].startswith("Bi-tuning Table 1: top-1")


def test_an_error_keeps_its_closing_quote(tmp_path, monkeypatch, capsys):
  code, _, err = _train_cli(monkeypatch, capsys, DEMO, f"--workdir={tmp_path}/run",
                            "--config.schedule=cosin")
  assert code == 2 and "Traceback" not in err, err[-2000:]
  assert err.strip().splitlines()[-1] == (
      "bitune-train: error: schedule must be 'step' or 'cosine', got 'cosin'")
  assert os.listdir(tmp_path) == []
  assert train_cli._one_line(KeyError("no field 'x'")) == "no field 'x'"  # pylint: disable=protected-access


@pytest.mark.parametrize("tool", ["bitune-eval", "bitune-export"])
def test_eval_and_export_take_the_same_which(tool, tmp_path, capsys):
  from bitune_jax.cli import eval as eval_cli, export as export_cli  # pylint: disable=g-import-not-at-top
  def call(*argv):
    args = [*argv, "--workdir", str(tmp_path)]
    try:
      code = (eval_cli.main(args) if tool == "bitune-eval"
              else export_cli.main([str(tmp_path / "out.npz"), *args]))
    except SystemExit as e:
      code = e.code
    return code, capsys.readouterr().err
  for which in ("latest", "best", "final"):  # final: bitune-export's old name of latest
    code, err = call("--which", which)
    assert code == 2 and err == (f"{tool}: error: {tmp_path} has no config.json: not a "
                                 "bitune-train workdir\n"), (which, err)
  code, err = call("--which", "last")
  assert code == 2 and ("argument --which: invalid choice: 'last' (choose from "
                        "'latest', 'best')") in err
  with pytest.raises(SystemExit):
    (eval_cli.main if tool == "bitune-eval" else export_cli.main)(["--help"])
  assert "--which {latest,best}" in capsys.readouterr().out


@pytest.mark.parametrize("signum,said", [
    ("SIGTERM", "SIGTERM: stopping after the current step to save a checkpoint"),
    ("SIGINT", "Ctrl-C (SIGINT): stopping after the current step to save a checkpoint "
               "(Ctrl-C again to stop at once)"),
])
def test_the_stop_notice_names_the_signal_it_got(signum, said):
  import signal  # pylint: disable=g-import-not-at-top
  import fakes  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import stopping  # pylint: disable=g-import-not-at-top
  signals = stopping.StopSignals()
  with fakes.our_log("WARNING") as records:
    signals._on_signal(getattr(signal, signum), None)  # pylint: disable=protected-access
  assert [r.getMessage() for r in records] == [said]
  assert signals.should_stop(1)
