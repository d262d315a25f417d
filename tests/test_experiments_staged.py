"""The staged programs (the main job, the DASH study) end to end: stored runs
shared between methods and reused on rerun, resumption after kill -9 and
SIGTERM, warm-start sources, and clear errors, against the real programs
(subprocesses) and the real orbax."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_cli, stored_runs

TINY = ["--dataset=mnist1d", "--model=conv1d", "--channels=8", "--batch_size=64",
        "--fraction=0.5", "--seeds=2", "--threshold=0", "--max_epochs=2", "--progress=false",
        "--block_steps=8"]


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return {"TFDS_DATA_DIR": data_dir, "WSJAX_TEST": "1"}, cache


def _args(env_cache, workdir, *extra):
  _, cache = env_cache
  return [*TINY, f"--workdir={workdir}", f"--compilation_cache_dir={cache}", *extra]


def _strip_times(results):
  for m in results["methods"].values():
    for s in m["stages"]:
      s.pop("wall_s")
  return results


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref")
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=cold,warm,sp,dash"), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


def test_cli_writes_results_table_and_plot(reference_run):
  workdir, p = reference_run
  results = json.load(open(workdir / "results.json"))
  assert set(results) == {"experiment", "config", "environment", "methods", "study"}
  # one CPU device per core, at most one per seed (2 seeds), seeds spread over them
  cores = len(os.sched_getaffinity(0))
  env = results["environment"]
  assert env["devices"] == env["seed_devices"] == min(cores, 2) and env["processes"] == 1
  assert list(results["methods"]) == ["cold", "warm", "sp", "dash"]
  for m in results["methods"].values():
    assert [s["n_train"] for s in m["stages"]] == [2000, 4000]
    for s in m["stages"]:
      assert len(s["test_acc"]) == len(s["train_acc"]) == len(s["steps"]) == 2
      assert all(0 <= a <= 1 for a in s["test_acc"])
    # fixed 2 epochs of ceil(n / 64) steps
    assert m["stages"][0]["steps"] == [2 * 32, 2 * 32]
    assert m["stages"][1]["steps"] == [2 * 63, 2 * 63]
    assert m["final_test_acc"]["mean"] == pytest.approx(np.mean(m["stages"][-1]["test_acc"]))
  png = open(workdir / "test_accuracy.png", "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert "final test acc" in p.stdout and "dash" in p.stdout
  # warm keeps the stage-0 model: its stage-1 start differs from cold's
  warm, cold = results["methods"]["warm"], results["methods"]["cold"]
  assert warm["stages"][0]["test_acc"] == cold["stages"][0]["test_acc"]
  assert warm["stages"][1]["test_acc"] != cold["stages"][1]["test_acc"]


def test_first_stage_is_one_stored_run_and_reused_exactly(reference_run, env, tmp_path):
  """cold, warm, sp and dash start their first stage from the same fresh init
  with the same program: one content-addressed run, trained once; warm
  trained on its own in another workdir gets the same results."""
  workdir, p = reference_run
  results = json.load(open(workdir / "results.json"))
  first = {m["stages"][0]["run"] for m in results["methods"].values()}
  assert len(first) == 1
  first_run = first.pop()
  for method in ("warm", "sp", "dash"):
    assert f"[{method}] stage 1: reusing finished run {first_run}" in p.stdout
  alone = run_cli("experiments.warm_start", *_args(env, tmp_path / "warm", "--methods=warm"),
                  env=env[0])
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert "reusing" not in alone.stdout
  got = _strip_times(json.load(open(tmp_path / "warm" / "results.json")))["methods"]["warm"]
  want = _strip_times(json.load(open(workdir / "results.json")))["methods"]["warm"]
  assert got == want
  # l2_init trains a penalized program from its first step: a run of its own
  p = run_cli("experiments.warm_start", *_args(env, tmp_path / "l2", "--methods=cold,l2_init"),
              env=env[0])
  assert p.returncode == 0, p.stderr[-2000:]
  assert "reusing" not in p.stdout
  l2 = json.load(open(tmp_path / "l2" / "results.json"))["methods"]
  assert l2["l2_init"]["stages"][0]["run"] != l2["cold"]["stages"][0]["run"]


def test_rerun_loads_finished_runs_and_a_changed_config_writes_new_runs_beside(
    reference_run, env, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(reference_run[0], workdir)
  before = open(workdir / "results.json").read()
  runs_before = sorted(os.listdir(workdir / "runs"))
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=cold,warm,sp,dash"),
              env=env[0])
  assert p.returncode == 0, p.stderr[-2000:]
  assert _strip_times(json.loads(before)) == _strip_times(json.load(open(workdir / "results.json")))
  assert p.stdout.count("reusing finished run") == 8  # every stage of every method
  assert sorted(os.listdir(workdir / "runs")) == runs_before
  # another configuration: new runs beside the old, both studies' results kept
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=cold", "--lr=0.01"),
              env=env[0])
  assert p.returncode == 0, p.stderr[-2000:]
  assert set(runs_before) < set(os.listdir(workdir / "runs"))
  studies = sorted(os.listdir(workdir / "studies"))
  assert len(studies) == 2
  kept = [json.load(open(workdir / "studies" / d / "results.json")) for d in studies]
  assert sorted(list(r["methods"]) for r in kept) == [["cold"], ["cold", "warm", "sp", "dash"]]
  listing = run_cli("experiments.runs", f"--workdir={workdir}", env=env[0])
  assert listing.returncode == 0 and "warm_start/dash/stage1" in listing.stdout



def test_kill_9_mid_run_then_resume_gives_identical_results(reference_run, env, tmp_path):
  """kill -9 once a run has finished and another has a mid-run checkpoint,
  then run again: finished runs are loaded, the rest resumes."""
  ref, _ = reference_run
  workdir = tmp_path / "killed"
  args = _args(env, workdir, "--methods=cold,warm,sp,dash", "--checkpoint_every=20")
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.warm_start", *args], cwd=REPO, env=e,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if stored_runs(workdir, "DONE") and stored_runs(workdir, "checkpoint"):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  p = run_cli("experiments.warm_start", *args, env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming" in p.stdout + p.stderr
  got = _strip_times(json.load(open(workdir / "results.json")))
  want = _strip_times(json.load(open(ref / "results.json")))
  assert got["methods"] == want["methods"]  # bit-exact on the CPU
  # every run is complete: no mid-run checkpoints left, init and final kept
  runs = list((workdir / "runs").iterdir())
  assert len(runs) == 5
  assert not [c for d in runs if (d / "checkpoints").is_dir()
              for c in (d / "checkpoints").iterdir() if c.name.isdigit()]
  for d in runs:
    assert (d / "DONE").exists() and sorted(x.name for x in (d / "snapshots").iterdir()) == [
        "final", "init"]


def _cold_final_run(ref):
  results = json.load(open(ref / "results.json"))
  return ref / "runs" / results["methods"]["cold"]["stages"][-1]["run"]


def test_warm_start_from_another_runs_snapshot(reference_run, env, tmp_path):
  ref, _ = reference_run
  source = f"{_cold_final_run(ref)}@final"
  workdir = tmp_path / "from_source"
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=warm", "--fraction=1.0",
                                               "--max_epochs=1", f"--warm_start_from={source}"), env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  results = json.load(open(workdir / "results.json"))
  cold_final = json.load(open(ref / "results.json"))["methods"]["cold"]["stages"][-1]["test_acc"]
  # one more epoch on all data from the cold run's final model: close to it,
  # far above the ~10-30% of a fresh model after one epoch
  got = results["methods"]["warm"]["stages"][0]["test_acc"]
  assert min(got) > min(cold_final) - 0.1
  assert results["config"]["warm_start_from"] == source
  # the old checkpoint layout gets a one-line pointer to the new form
  p = run_cli("experiments.warm_start", *_args(env, tmp_path / "old", "--methods=warm",
                                               f"--warm_start_from={ref}/checkpoints/cold"),
              env=env[0])
  assert p.returncode == 2 and "RUN[@SNAPSHOT]" in p.stderr.strip().splitlines()[-1]


def test_warm_start_source_mismatch_lists_paths(reference_run, env, tmp_path):
  ref, _ = reference_run
  p = run_cli("experiments.warm_start", *_args(env, tmp_path / "mm", "--methods=warm", "--channels=16",
                                               f"--warm_start_from={_cold_final_run(ref)}"),
              env=env[0])
  assert p.returncode == 2, p.stderr[-2000:]
  line = p.stderr.strip().splitlines()[-1]
  assert "does not match the model" in line and "conv1" in line and "(5, 1, 8)" in line and "(5, 1, 16)" in line
  assert not (tmp_path / "mm" / "results.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--dataset=imagenet7"], "unknown dataset"),
    (["--model=transformer"], "unknown model"),
    (["--methods=cold,magic"], "unknown method"),
    (["--optimizer=lion"], "should be one of"),
    (["--lr=-0.1"], "learning rate must be positive"),
    (["--shrink=1.5", "--methods=shrink_perturb"], "--shrink must be in [0, 1]"),
    (["--fraction=1.5"], "fraction"),
    (["--schedule=chunks", "--chunks=0"], "chunk"),
    (["--batch_size=100000"], "batch size"),
    (["--warm_start_from=/nonexistent/ckpt"], "does not exist"),
    (["--lr=abc"], "could not convert"),
    (["--opt_state=sometimes"], "should be one of"),
    (["--no_such_flag=1"], "unknown command line flag"),
    (["--host_devices=2", "--seed_devices=3"], "seed_devices=3 does not divide the 2 devices"),
    (["--host_devices=-1"], "must be >= 0"),
    (["--replica_chunk=-2"], "--replica_chunk must be >= 0"),
    (["--dataset=digits", "--model=conv1d"], "takes 1-D signals"),
    (["--lr_schedule=cosine", "--decay_steps=x"], "is not an int"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, extra, message):
  workdir = tmp_path / "w"
  p = run_cli("experiments.warm_start", *_args(env, workdir, *extra), env=env[0])
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and message.lower() in lines[-1].lower(), lines[-1]
  assert "Traceback" not in p.stderr
  assert not (workdir / "results.json").exists()


@pytest.mark.parametrize("model,dataset,message", [
    ("--model=resnet18", "--dataset=mnist1d", "takes images (height, width, channels)"),
    ("--model=conv1d", "--dataset=digits", "takes 1-D signals (length, channels)")])
def test_a_model_that_does_not_fit_the_data_is_one_line(env, tmp_path, model, dataset, message):
  p = run_cli("experiments.warm_start", model, dataset, "--seeds=1", "--batch_size=64",
              f"--workdir={tmp_path}", "--compilation_cache_dir=", env=env[0])
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1] and "shape" in lines[-1], lines
  assert "Traceback" not in p.stderr


def test_sigterm_saves_a_checkpoint_and_resumes(reference_run, env, tmp_path):
  ref, _ = reference_run
  workdir = tmp_path / "term"
  args = _args(env, workdir, "--methods=cold,warm,sp,dash")
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.warm_start", *args], cwd=REPO, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not stored_runs(workdir, "DONE"):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  if proc.returncode == 0:
    pytest.skip("the run finished before SIGTERM arrived")
  assert proc.returncode == 143, err[-2000:]
  assert "preempted" in err and "Traceback" not in err
  assert stored_runs(workdir, "checkpoint")
  p = run_cli("experiments.warm_start", *args, env=env[0])
  assert p.returncode == 0, p.stderr[-2000:]
  assert "resuming" in p.stdout + p.stderr
  got = _strip_times(json.load(open(workdir / "results.json")))
  assert got["methods"] == _strip_times(json.load(open(ref / "results.json")))["methods"]


def test_corrupt_snapshot_is_a_clear_error(reference_run, env, tmp_path):
  import shutil
  ref, _ = reference_run
  workdir = tmp_path / "corrupt"
  shutil.copytree(ref, workdir)
  results = json.load(open(workdir / "results.json"))
  run = workdir / "runs" / results["methods"]["dash"]["stages"][-1]["run"]
  (run / "snapshots" / "final" / "_METADATA").write_text("{not json")
  before = (workdir / "results.json").read_bytes()
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=cold,warm,sp,dash"), env=env[0])
  assert p.returncode == 2, p.stderr[-2000:]
  line = p.stderr.strip().splitlines()[-1]
  assert "cannot be read" in line and run.name in line and "Traceback" not in p.stderr
  assert (workdir / "results.json").read_bytes() == before  # nothing lost


def test_non_finite_loss_stops_with_stage_and_step(env, tmp_path):
  workdir = tmp_path / "nan"
  p = run_cli("experiments.warm_start", *_args(env, workdir, "--methods=cold", "--optimizer=sgd",
                                               "--lr=1e6", "--momentum=0.9"), env=env[0])
  assert p.returncode == 2, p.stderr[-2000:]
  line = p.stderr.strip().splitlines()[-1]
  assert "non-finite loss" in line and "stage 0" in line and "step" in line, line
  assert not (workdir / "results.json").exists()


def test_unwritable_workdir_and_unprepared_dataset(env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  p = run_cli("experiments.warm_start", *_args(env, blocker / "sub", "--methods=cold"), env=env[0])
  assert p.returncode == 2 and "cannot be written" in p.stderr.strip().splitlines()[-1], p.stderr[-1500:]
  p = run_cli("experiments.warm_start", *_args(env, tmp_path / "w", "--dataset=cifar10",
                                               f"--data_dir={tmp_path / 'empty'}"), env=env[0])
  assert p.returncode == 2, p.stderr[-1500:]
  line = p.stderr.strip().splitlines()[-1]
  assert "cifar10" in line and "tfds build" in line and "Traceback" not in p.stderr


def test_two_processes_equal_one_process_with_the_same_devices(env, tmp_path):
  """jax.distributed over loopback: 2 processes x 4 CPU devices == 1 x 8."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # SGD: Adam would amplify the rounding differences of the two all-reduce
  # implementations (gloo between processes, in-process on one) in 190 steps
  common = ["--methods=cold,dash", "--compilation_cache_dir=", "--optimizer=sgd", "--lr=0.05"]
  base = [a for a in _args(env, tmp_path / "x") if not a.startswith(("--workdir", "--compilation"))]
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1",
           XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.warm_start", *base, *common, f"--workdir={tmp_path / 'multi'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # only process 0 writes
  p = run_cli("experiments.warm_start", *base, *common, f"--workdir={tmp_path / 'single'}",
              env=env[0], devices=8)
  assert p.returncode == 0, p.stderr[-3000:]
  multi = json.load(open(tmp_path / "multi" / "results.json"))
  single = json.load(open(tmp_path / "single" / "results.json"))
  assert multi["environment"]["processes"] == 2 and multi["environment"]["devices"] == 8
  assert single["environment"]["processes"] == 1 and single["environment"]["devices"] == 8
  for name in ("cold", "dash"):
    for a, b in zip(multi["methods"][name]["stages"], single["methods"][name]["stages"]):
      assert a["steps"] == b["steps"]
      np.testing.assert_allclose(a["test_acc"], b["test_acc"], atol=2e-3)
      # rounding: the all-reduce inside a seed group sums in another order
      np.testing.assert_allclose(a["param_norm"], b["param_norm"], rtol=1e-3)


def test_dash_experiment_end_to_end(env, tmp_path):
  """experiments.dash with every method, tiny flags: table, results.json, plots."""
  workdir = tmp_path / "dash"
  methods = "cold,warm,warm_rm,sp,shrink_perturb,reset,l2_init,dash"
  _, cache = env
  p = run_cli("experiments.dash", "--dataset=mnist1d", "--channels=8", "--batch_size=64",
              "--chunks=3", "--seeds=2", "--threshold=0.3", "--max_epochs=2", "--progress=false",
              "--block_steps=8", f"--methods={methods}", f"--workdir={workdir}",
              f"--compilation_cache_dir={cache}", env=env[0])
  assert p.returncode == 0, p.stderr[-3000:]
  results = json.load(open(workdir / "results.json"))
  assert list(results["methods"]) == methods.split(",")
  assert results["config"]["arrivals"]["schedule"] == "chunks"
  assert results["config"]["optimizer"]["name"] == "sgd"
  for m in results["methods"].values():
    assert [s["n_train"] for s in m["stages"]] == [1333, 2666, 3999]
    assert set(m) >= {"final_test_acc", "mean_test_acc", "total_steps"}
    for s in m["stages"]:
      assert set(s) >= {"dead_relu", "param_norm", "dist_from_stage_start", "dash_cosine_hist"}
      assert sum(s["dash_cosine_hist"]["overall"]) > 0
      assert all(0 <= f <= 1 for f in s["dead_relu"]["overall"])
      # the threshold stops each seed on its own, within the 2-epoch cap
      assert all(0 < st <= 2 * -(-s["n_train"] // 64) for st in s["steps"])
  # warm's stage-2 start is the trained model: it needs no more steps than cold
  assert results["methods"]["warm"]["total_steps"]["mean"] <= results["methods"]["cold"]["total_steps"]["mean"]
  for png in ("test_accuracy.png", "cumulative_steps.png", "diagnostics.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"
  assert "total steps" in p.stdout
