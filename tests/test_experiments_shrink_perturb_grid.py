"""The shrink-and-perturb grid program end to end (real subprocesses, real
orbax): results.json, the two heatmaps and the tables; a rerun loads both
stored runs; kill -9 mid-grid, then the same command = identical results;
bad inputs are one line and exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, stored_runs

SHRINKS, PERTURBS = (0.0, 0.5, 1.0), (0.0, 1.0)
TINY = ["--dataset=mnist1d", "--model=mlp", "--widths=16", "--batch_size=64", "--seeds=2",
        "--shrinks=0,0.5,1", "--perturbs=0,1", "--threshold=0", "--max_epochs=2",
        "--progress=false", "--block_steps=8"]


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
  return {"TFDS_DATA_DIR": data_dir}, str(tmp_path_factory.mktemp("xla_cache"))


def _args(env_cache, workdir, *extra):
  return [*TINY, f"--workdir={workdir}", f"--compilation_cache_dir={env_cache[1]}", *extra]


def _strip_times(results):
  results["stage1"].pop("wall_s")
  results["grid"].pop("wall_s")
  return results


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref")
  p = run_cli("experiments.shrink_perturb_grid", *_args(env, workdir), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


def test_results_plots_and_tables(reference):
  workdir, p = reference
  results = json.load(open(workdir / "results.json"))
  assert set(results) == {"experiment", "config", "environment", "stage1", "grid", "study"}
  assert results["config"]["shrinks"] == list(SHRINKS)
  assert results["environment"]["devices"] == min(len(os.sched_getaffinity(0)), 12)
  assert results["stage1"]["steps"] == [2 * 32, 2 * 32]  # 2,000 examples, batch 64
  grid = results["grid"]
  assert grid["n_train"] == 4000 and len(grid["cells"]) == 6
  assert [(c["shrink"], c["perturb"]) for c in grid["cells"]] == [
      (s, q) for q in PERTURBS for s in SHRINKS]
  for c in grid["cells"]:
    assert c["steps"] == [2 * 63, 2 * 63]
    assert len(c["test_acc"]) == len(c["start_test_acc"]) == len(c["train_acc"]) == 2
    assert all(0 <= a <= 1 for a in c["test_acc"] + c["start_test_acc"])
  for name in ("grid_accuracy.png", "grid_steps.png"):
    png = (workdir / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (workdir / "studies" / results["study"] / name).exists()
  assert "final test accuracy %" in p.stdout and "training steps" in p.stdout
  assert "perturb \\ shrink" in p.stdout and "wrote" in p.stdout
  # two stored runs: stage 1 (2 seeds) and the grid (6 cells x 2 seeds)
  assert len(list((workdir / "runs").iterdir())) == 2


def test_rerun_loads_both_runs(reference, env, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(reference[0], workdir)
  before = json.load(open(workdir / "results.json"))
  p = run_cli("experiments.shrink_perturb_grid", *_args(env, workdir), env=env[0])
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.count("reusing finished run") == 2
  assert json.load(open(workdir / "results.json")) == before



def test_kill_9_mid_grid_then_the_same_command_gives_identical_results(reference, env, tmp_path):
  ref, _ = reference
  workdir = tmp_path / "killed"
  args = _args(env, workdir, "--checkpoint_every=20")
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.shrink_perturb_grid", *args],
                          cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if stored_runs(workdir, "DONE") and stored_runs(workdir, "checkpoint"):  # stage 1 done, grid mid-way
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  p = run_cli("experiments.shrink_perturb_grid", *args, env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming" in p.stdout + p.stderr and "reusing finished run" in p.stdout
  got = _strip_times(json.load(open(workdir / "results.json")))
  want = _strip_times(json.load(open(ref / "results.json")))
  assert got["stage1"] == want["stage1"] and got["grid"] == want["grid"]  # bit-exact on the CPU


@pytest.mark.parametrize("extra,message", [
    (["--shrinks=0,1.5"], "--shrinks: 1.5 is outside [0, 1]"),
    (["--perturbs="], "--perturbs is empty"),
    (["--shrinks=0,abc"], "'abc' is not a number"),
    (["--fraction=1"], "--fraction must be in (0, 1)"),
    (["--batch_size=3000"], "larger than stage 1's 2000 examples"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, extra, message):
  workdir = tmp_path / "w"
  p = run_cli("experiments.shrink_perturb_grid", *_args(env, workdir, *extra), env=env[0])
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
  assert "Traceback" not in p.stderr
  assert not (workdir / "results.json").exists()
