"""The early-phase programs end to end (experiments.lottery and
experiments.instability): results.json, plots and tables with tiny flags, a
kill -9 and a rerun giving the same results, the instability program
reading IMP masks from the lottery program's runs, bad input as one line
and exit code 2 (real subprocesses, real orbax)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_cli, stored_runs

TINY = ["--model=mlp", "--widths=16", "--batch_size=64", "--training_steps=20it", "--seeds=2",
        "--progress=false", "--block_steps=8"]
LOTTERY = [*TINY, "--rewind_steps=0it,5it", "--levels=2",
           "--variants=imp,random_pruning,shuffle"]
INSTABILITY = [*TINY, "--rewind_steps=0it,5it", "--copies=2", "--points=5", "--imp_levels=2"]


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
  return {"TFDS_DATA_DIR": data_dir}, str(tmp_path_factory.mktemp("xla_cache"))


def _run(env, module, workdir, *args, extra=()):
  return run_cli(module, *args, *extra, f"--workdir={workdir}",
                 f"--compilation_cache_dir={env[1]}", env=env[0])


def _strip(results):
  for lin in results.get("lineages", []):
    for rec in lin["levels"]:
      rec.pop("wall_s")
  for curve in results.get("curves", []):
    for p in curve["points"]:
      p.pop("wall_s")
  return results


@pytest.fixture(scope="module")
def lottery_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lottery")
  p = _run(env, "experiments.lottery", workdir, *LOTTERY)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


def test_lottery_writes_results_plot_and_table(lottery_run):
  workdir, p = lottery_run
  out = json.load(open(workdir / "results.json"))
  assert {"experiment", "config", "environment", "lineages", "study", "total_steps"} <= set(out)
  assert out["experiment"] == "lottery" and out["total_steps"] == 20
  assert [(lin["pretrain"], lin["rewind"]) for lin in out["lineages"]] == [("none", "0it"),
                                                                         ("none", "5it")]
  # the dense reference is the k = 0 lineage's level 0 (one run)
  assert out["dense"]["run"] == out["lineages"][0]["levels"][0]["run"]
  assert out["dense"]["per_seed"] == out["lineages"][0]["levels"][0]["variants"]["imp"]["test_acc"]
  for lin in out["lineages"]:
    assert [rec["level"] for rec in lin["levels"]] == [0, 1, 2]
    assert lin["dense_from_k"]["per_seed"] == lin["levels"][0]["variants"]["imp"]["test_acc"]
    for rec in lin["levels"]:
      assert rec["density"] == pytest.approx([1.0, 0.8, 0.64][rec["level"]], abs=0.01)
      for acc in rec["variants"].values():
        assert len(acc["test_acc"]) == 2 and all(0 <= a <= 1 for a in acc["test_acc"])
        assert acc["steps"] == [20 - lin["rewind_step"]] * 2
        assert acc["matches"] == (acc["mean"] >= out["dense"]["mean"] - out["dense"]["std"])
    assert set(lin["levels"][1]["variants"]) == {"imp", "random_pruning", "shuffle"}
    assert set(lin["matching"]) == {"imp", "random_pruning", "shuffle"}
  png = (workdir / "accuracy_vs_sparsity.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert "density %" in p.stdout and "random_pruning" in p.stdout and "80.0" in p.stdout
  assert (workdir / "studies" / out["study"] / "results.json").exists()



def test_kill_9_then_the_same_command_gives_the_same_results(lottery_run, env, tmp_path):
  ref, _ = lottery_run
  workdir = tmp_path / "killed"
  args = [*LOTTERY, f"--workdir={workdir}", f"--compilation_cache_dir={env[1]}",
          "--checkpoint_every=3"]
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.lottery", *args], cwd=REPO, env=e,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if stored_runs(workdir, "DONE") and stored_runs(workdir, "checkpoint"):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  p = run_cli("experiments.lottery", *args, env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming" in p.stdout + p.stderr and "reusing finished run" in p.stdout + p.stderr
  got = _strip(json.load(open(workdir / "results.json")))
  want = _strip(json.load(open(ref / "results.json")))
  assert got["lineages"] == want["lineages"]  # bit-exact on the CPU
  assert not stored_runs(workdir, "checkpoint") and len(stored_runs(workdir, "DONE")) == 7


def test_instability_reads_masks_from_the_lottery_runs(lottery_run, env, tmp_path):
  workdir = tmp_path / "both"
  shutil.copytree(lottery_run[0], workdir)
  p = _run(env, "experiments.instability", workdir, *INSTABILITY)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.count("IMP masks of level 2 from the stored lottery run") == 2
  assert "[pretrain none] reusing finished run" in p.stdout
  out = json.load(open(workdir / "results.json"))
  assert out["experiment"] == "instability"
  assert [(c["pretrain"], c["level"]) for c in out["curves"]] == [("none", 0), ("none", 2)]
  for curve in out["curves"]:
    assert [pt["rewind"] for pt in curve["points"]] == ["0it", "5it"]
    for pt in curve["points"]:
      assert len(pt["path"]["test_error"]) == 5 and len(pt["alphas"]) == 5
      assert pt["barrier"]["test_error"]["mean"] >= 0 and pt["steps"] == [20 - pt["rewind_step"]] * 4
      path = np.asarray(pt["path"]["test_error"])
      assert path.max() >= (path[0] + path[-1]) / 2 - 1e-6
  for png in ("instability.png", "interpolation.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"
  assert "test error barrier %" in p.stdout and "IMP level 2 (64%)" in p.stdout
  # the lottery program's results stay in its own study directory
  assert len(list((workdir / "studies").iterdir())) == 2


@pytest.mark.parametrize("module,extra,message", [
    ("experiments.lottery", ["--training_steps=12xx"], "malformed step '12xx'"),
    ("experiments.lottery", ["--rewind_steps=0it,2ep"], "rewind step 2ep is not before the end"),
    ("experiments.lottery", ["--prune_fraction=1.5"], "--prune_fraction must be in (0, 1)"),
    ("experiments.lottery", ["--variants=imp,twist"], "unknown variant twist"),
    ("experiments.lottery", ["--pretrain=rotation"], "rotation pre-training needs image data"),
    ("experiments.instability", ["--copies=1"], "--copies must be in [2, 1000]"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, module, extra, message):
  """A few through the programs (every check is tested in process in
  tests/test_studies_lottery.py and tests/test_studies_instability.py)."""
  args = LOTTERY if module == "experiments.lottery" else INSTABILITY
  p = _run(env, module, tmp_path / "w", *args, extra=extra)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "w" / "results.json").exists()
  assert not (tmp_path / "w" / "runs").exists()
