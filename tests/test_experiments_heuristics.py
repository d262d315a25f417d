"""The curves and heuristics programs end to end (real subprocesses, real
orbax): results, plots and tables with tiny flags; kill -9 then the same
command gives identical results; bad input is one line and exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, stored_runs

COMMON = ["--progress=false", "--block_steps=4", "--channels=4"]
CURVES = [*COMMON, "--pairs=1", "--epochs=2", "--curve_epochs=2", "--curve_points=5",
          "--batch_size=200", "--checkpoint_every=4"]
STUDIES = {
    "sgdr": ["--study=sgdr", "--seeds=2", "--epochs=3", "--sgdr_t0_epochs=1", "--batch_size=400",
             "--curve_epochs=1", "--curve_points=4", "--cca_examples=40"],
    "warmup": ["--study=warmup", "--dataset=mnist1d", "--seeds=2", "--epochs=2",
               "--batch_size=100", "--large_batch=1000", "--large_lr=0", "--large_warmup_steps=4",
               "--snapshot_every=2", "--cca_examples=40", "--checkpoint_every=2"],
    "distillation": ["--study=distillation", "--seeds=2", "--epochs=1", "--teacher_scale=2",
                     "--batch_size=400", "--cca_examples=40"],
}
PLOTS = {"sgdr": ["sgdr_paths.png", "sgdr_cca.png"], "warmup": ["warmup_cca.png"],
         "distillation": ["distillation_cca.png"]}


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return {"TFDS_DATA_DIR": data_dir}, cache


def _run(env, module, workdir, *args):
  e, cache = env
  return run_cli(module, *args, f"--workdir={workdir}", f"--compilation_cache_dir={cache}", env=e)


def _strip(results):
  """results.json without wall times."""
  results.pop("wall_s", None)
  return results


def _png(path):
  data = open(path, "rb").read()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.fixture(scope="module")
def curves_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("curves")
  p = _run(env, "experiments.curves", workdir, *CURVES)
  assert p.returncode == 0, p.stderr[-3000:]
  # (a copy: a later test writes another results.json into this workdir)
  return workdir, p, json.load(open(workdir / "results.json"))


@pytest.fixture(scope="module")
def study_runs(env, tmp_path_factory):
  out = {}
  for name, args in STUDIES.items():
    workdir = tmp_path_factory.mktemp(name)
    p = _run(env, "experiments.heuristics", workdir, *COMMON, *args)
    assert p.returncode == 0, f"{name}: {p.stderr[-3000:]}"
    out[name] = (workdir, p)
  return out


def _runs_by_label(workdir):
  out = {}
  for d in (workdir / "runs").iterdir():
    out[json.load(open(d / "spec.json"))["label"]] = d
  return out


def test_curves_program_writes_results_plot_and_table(curves_run, env):
  workdir, p, r = curves_run
  assert r["experiment"] == "curves" and r["curves"] == 1 and len(r["ts"]) == 5
  for path in ("curve", "line"):
    for metric in ("train_loss", "train_error", "test_loss", "test_error"):
      values = r[path][metric]
      assert len(values) == 1 and len(values[0]) == 5
    # both paths start and end at the same two networks
    assert r[path]["test_error"][0][0] == r["line"]["test_error"][0][0]
    assert r[path]["test_error"][0][-1] == r["line"]["test_error"][0][-1]
  assert r["curve_steps"] == 2 * 20  # 2 epochs of 4,000 / 200
  assert _png(workdir / "curve.png")
  assert "test error barrier" in p.stdout and "curve" in p.stdout and "line" in p.stdout


def test_curve_between_named_stored_snapshots_is_the_same_stored_curve(curves_run, env):
  """--start/--end naming the endpoints the default trained: the same curve
  run (content-addressed by the endpoints' origin), loaded, not retrained."""
  workdir, _, before = curves_run
  endpoints = _runs_by_label(workdir)["curves/endpoints"]
  before = _strip(dict(before))
  p = _run(env, "experiments.curves", workdir, *CURVES, f"--start={endpoints}@final:0",
           f"--end={endpoints.name}@final:1")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[curves] reusing finished run" in p.stdout
  after = _strip(json.load(open(workdir / "results.json")))
  for key in ("ts", "curve", "line", "barriers", "curve_run"):
    assert after[key] == before[key]


def _killed_then_rerun(env, module, workdir, args, ready):
  """Starts the program, kill -9 once `ready(workdir)`, runs it again."""
  e = dict(os.environ, **env[0], PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", module, *args, f"--workdir={workdir}",
         f"--compilation_cache_dir={env[1]}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not ready(workdir):
    time.sleep(0.05)
  assert proc.poll() is None, "the program ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  p = _run(env, module, workdir, *args)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming" in p.stdout + p.stderr
  return p


def _has_checkpoint(workdir, done_too=False):
  mid = bool(stored_runs(workdir, "checkpoint"))
  return mid and (not done_too or bool(stored_runs(workdir, "DONE")))


def test_curves_program_killed_mid_curve_resumes_to_identical_results(curves_run, env, tmp_path):
  _, _, want = curves_run
  workdir = tmp_path / "killed"
  # kill once the endpoints are done and the curve has a mid-run checkpoint
  _killed_then_rerun(env, "experiments.curves", workdir, CURVES,
                     lambda w: _has_checkpoint(w, done_too=True))
  got = _strip(json.load(open(workdir / "results.json")))
  for key in ("ts", "curve", "line", "barriers", "summary", "endpoints", "curve_run"):
    assert got[key] == want[key]  # bit-identical on the CPU


@pytest.mark.parametrize("name", list(STUDIES))
def test_heuristics_programs_write_results_plots_and_tables(study_runs, name):
  workdir, p = study_runs[name]
  r = json.load(open(workdir / "results.json"))
  assert r["heuristic"] == name and r["config"]["study"] == name
  for plot in PLOTS[name]:
    assert _png(workdir / plot)
  if name == "sgdr":
    assert r["cycle_ends"] == [10, 30] and [g["kind"] for g in r["pairs"]] == [
        "iterates", "independent"]
    for group in r["paths"]["groups"]:
      assert set(group) == {"curve", "line", "endpoint_test_error"}
    assert "test error barrier" in p.stdout and "independent" in p.stdout
  elif name == "warmup":
    assert list(r["conditions"]) == ["small", "large_warmup", "large", "large_frozen"]
    assert r["large_lr"] == pytest.approx(0.5)  # --large_lr=0: 0.05 x 1000 / 100
    assert r["snapshots"] == {"large": [0, 2, 4], "small": [0, 20, 40]}
    for c in r["conditions"].values():
      assert len(c["consecutive"]["relu3"]) == 2 and len(c["to_final"]["relu3"]) == 3
    assert r["frozen_layers"] == ["head"] and "consecutive" in p.stdout
  else:
    assert r["layer_pairs"] == [["relu1", "relu1"], ["relu2", "relu2"], ["relu3", "relu3"]]
    assert r["teacher_model"]["channels"] == 8 and "distilled" in p.stdout


def test_warmup_study_killed_mid_run_resumes_to_identical_results(study_runs, env, tmp_path):
  """Two of the four conditions (to keep it short): the same runs, by
  name, as the reference's; killed in the second, rerun: identical."""
  ref, _ = study_runs["warmup"]
  workdir = tmp_path / "killed"
  args = [*COMMON, *STUDIES["warmup"], "--conditions=small,large_frozen"]
  _killed_then_rerun(env, "experiments.heuristics", workdir, args,
                     lambda w: _has_checkpoint(w, done_too=True))
  got = json.load(open(workdir / "results.json"))
  want = json.load(open(ref / "results.json"))
  assert list(got["conditions"]) == ["small", "large_frozen"]
  for name in got["conditions"]:
    assert got["conditions"][name] == want["conditions"][name]


def _error_line(p):
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-2000:]
  assert lines and lines[-1].startswith("error: ")
  return lines[-1]


def test_bad_inputs_are_one_line_and_exit_2(study_runs, env, tmp_path):
  runs = _runs_by_label(study_runs["distillation"][0])
  teacher, student = runs["heuristics/teacher"], runs["heuristics/student"]
  # endpoints of different models: every mismatched path named
  p = _run(env, "experiments.curves", tmp_path / "a", *CURVES, f"--start={teacher}@final:0",
           f"--end={student}@final:0")
  line = _error_line(p)
  assert "endpoints are different models" in line
  assert "conv1/kernel" in line and "conv3/bias" in line and "head/kernel" in line
  # an unknown layer for CCA: the available ones listed
  p = _run(env, "experiments.heuristics", tmp_path / "b", *COMMON, *STUDIES["distillation"],
           "--cca_layers=relu2,relu9")
  assert "unknown layer 'relu9'" in _error_line(p) and "available: relu1, relu2, relu3" in p.stderr
  # more SVCCA directions than neurons
  p = _run(env, "experiments.heuristics", tmp_path / "c", *COMMON, *STUDIES["warmup"],
           "--similarity=svcca", "--svcca_directions=6")
  line = _error_line(p)
  assert "--svcca_directions=6" in line and "4 neurons" in line
  # a missing teacher snapshot
  p = _run(env, "experiments.heuristics", tmp_path / "d", *COMMON, *STUDIES["distillation"],
           f"--teacher={teacher}@step_7")
  line = _error_line(p)
  assert "--teacher" in line and "no snapshot 'step_7'" in line and "final" in line
  for d in ("a", "b", "c", "d"):
    assert not (tmp_path / d / "results.json").exists()
    assert not (tmp_path / d / "runs").exists()
