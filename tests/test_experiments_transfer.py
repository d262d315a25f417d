"""The learning-transfer and weight-matching programs end to end (real
subprocesses, real orbax): results, plots and table; kill -9 and the same
command again = identical results; bad input is one `error:` line, exit
code 2, and no results."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, stored_runs

LT = ["--dataset=mnist1d", "--widths=16", "--batch_size=128", "--epochs=1", "--points=3",
      "--seeds=2", "--pretrain_epochs=1", "--finetune_epochs=1", "--eval_every=10",
      "--lr=0.05", "--progress=false", "--block_steps=8"]
WM = ["--dataset=mnist1d", "--widths=1,1", "--sweep_widths=4,16", "--epochs=1", "--points=5",
      "--seeds=1", "--barrier_train_examples=500", "--progress=false", "--block_steps=8"]


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return {"TFDS_DATA_DIR": data_dir, "WSJAX_TEST": "1"}, cache


def _args(env_cache, base, workdir, *extra):
  return [*base, f"--workdir={workdir}", f"--compilation_cache_dir={env_cache[1]}", *extra]


def _strip_times(out):
  """results.json without wall-clock numbers (they are measured, not computed)."""
  for setting in out.get("settings", {}).values():
    for m in setting["methods"].values():
      for c in m["cost"]:
        for k in [k for k in c if k.endswith("_s")]:
          c.pop(k)
  for rec in out.get("widths", {}).values():
    for m in rec["match"]:
      for k in [k for k in m if k.endswith("_s")]:
        m.pop(k)
  return out


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lt_ref")
  p = run_cli("experiments.learning_transfer", *_args(env, LT, workdir), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


def test_learning_transfer_writes_results_table_and_plots(reference):
  workdir, p = reference
  out = json.load(open(workdir / "results.json"))
  assert {"experiment", "config", "environment", "pairs", "settings", "study"} <= set(out)
  assert list(out["settings"]) == ["fresh", "pretrained"]
  for setting in out["settings"].values():
    assert set(setting["methods"]) == {"gmt", "fgmt", "naive", "oracle"}
    for m in setting["methods"].values():
      assert all(0 <= a <= 1 for row in m["test_acc"] for a in row)
    assert set(setting["finetune"]["starts"]) == {"init", "gmt", "fgmt", "naive", "oracle"}
  for name in ("transfer_accuracy.png", "finetune.png"):
    png = open(workdir / name, "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  for word in ("GMT", "FGMT", "naive", "oracle", "init (theta'_0)", "steps to target"):
    assert word in p.stdout



def test_kill_9_then_rerun_gives_identical_results(reference, env, tmp_path):
  """Killed once a run has finished and another holds a mid-run checkpoint;
  the same command loads the finished runs, resumes the rest, and writes
  the same results (timings aside) as the uninterrupted reference (the
  fresh setting: its runs are the reference's, by content)."""
  ref, _ = reference
  workdir = tmp_path / "killed"
  args = _args(env, LT, workdir, "--checkpoint_every=10", "--inits=fresh")
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.learning_transfer", *args],
                          cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if stored_runs(workdir, "DONE") and stored_runs(workdir, "checkpoint"):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the program ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  p = run_cli("experiments.learning_transfer", *args, env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming" in p.stdout + p.stderr
  got = _strip_times(json.load(open(workdir / "results.json")))
  want = _strip_times(json.load(open(ref / "results.json")))
  assert got["settings"]["fresh"] == want["settings"]["fresh"]
  assert not stored_runs(workdir, "checkpoint")


def _error_line(p):
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-2000:]
  assert lines[-1].startswith("error: ")
  return lines[-1]


def test_bad_inputs_are_one_line_errors(reference, env, tmp_path):
  ref, _ = reference
  out = json.load(open(ref / "results.json"))
  source = ref / "runs" / out["settings"]["fresh"]["target_run"]

  def fails(*extra, base=LT):
    workdir = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    p = run_cli("experiments.learning_transfer", *_args(env, base, workdir, *extra), env=env[0])
    assert not (workdir / "results.json").exists()
    return _error_line(p)

  line = fails(f"--source={source}", "--inits=fresh", "--widths=24", "--seeds=4")
  assert "does not match the model" in line and "dense1/kernel" in line and "(40, 16)" in line
  assert "(40, 24)" in line
  line = fails("--model=logreg", base=[a for a in LT if not a.startswith("--widths")])
  assert "no permutation spec for model 'logreg'" in line and "mlp, conv1d" in line
  line = fails(f"--source={tmp_path / 'nowhere'}", "--inits=fresh")
  assert line.startswith("error: --source ") and "does not exist" in line
  line = fails("--points=0")
  assert "T must be an int >= 1, got 0" in line
  line = fails(f"--source={source}", "--inits=fresh", "--trajectory=snapshots", "--seeds=4")
  assert "has no snapshot 'step_" in line and "init" in line and "--trajectory=linear" in line


def test_external_source_runs(reference, env, tmp_path):
  """A stored run's trajectory as the source: the fresh setting only, its
  replicas the pairs' sources (the reference's 4 networks of 2 pairs are 4
  pairs' sources here); no source run is trained."""
  ref, _ = reference
  out = json.load(open(ref / "results.json"))
  source = ref / "runs" / out["settings"]["fresh"]["target_run"]
  workdir = tmp_path / "ext"
  p = run_cli("experiments.learning_transfer",
              *_args(env, LT, workdir, f"--source={source}", "--inits=fresh", "--seeds=4",
                     "--methods=fgmt,naive", "--finetune_epochs=0"), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.load(open(workdir / "results.json"))["settings"]["fresh"]
  assert got["source_run"] == source.name and got["source_test_acc"] is None
  assert set(got["methods"]) == {"fgmt", "naive"} and got["finetune"] == {}


def test_weight_matching_program(env, tmp_path):
  workdir = tmp_path / "wm"
  p = run_cli("experiments.weight_matching", *_args(env, WM, workdir), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.load(open(workdir / "results.json"))
  assert list(out["widths"]) == ["4", "16"]
  png = open(workdir / "barrier_vs_width.png", "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert "test loss barrier" in p.stdout and "after matching" in p.stdout
  first = open(workdir / "results.json").read()
  p = run_cli("experiments.weight_matching", *_args(env, WM, workdir), env=env[0])
  assert p.returncode == 0 and p.stdout.count("reusing finished") == 4
  assert open(workdir / "results.json").read() == first
  p = run_cli("experiments.weight_matching", *_args(env, WM, tmp_path / "bad",
                                                    "--model=vgg11"), env=env[0])
  assert "has no width option" in _error_line(p)
