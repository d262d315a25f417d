"""The benchmarks' own machinery (fast: no benchmark is run here).

* every registered benchmark module, and every name it imports from wsjax
  (at the top or inside a function), exists: the benchmarks follow the
  library's API;
* `benchmarks.core`: the compilation log is counted and summed as JAX
  writes it, a process's times and exit code are measured, a run of the
  "before" side uses the baseline's own programs, results are compared per
  method, stage and key, and a missing baseline is a clear skip.
"""
from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import sys

import pytest

from benchmarks import core
from benchmarks import run as run_lib

BENCH_DIR = os.path.dirname(os.path.abspath(core.__file__))


def _wsjax_imports(path):
  """(module, name or None) of every `import wsjax...` / `from wsjax... import name`."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "wsjax":
          yield alias.name, None
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] == "wsjax":
        for alias in node.names:
          yield node.module, alias.name


@pytest.mark.parametrize("name", sorted(run_lib.BENCHMARKS))
def test_registered_benchmark_imports_exist(name):
  module_name = run_lib.BENCHMARKS[name][0]
  module = importlib.import_module(module_name)
  assert callable(module.run) and callable(module.report)
  missing = []
  for mod, attr in _wsjax_imports(module.__file__):
    target = importlib.import_module(mod)
    if attr is not None and not hasattr(target, attr):
      try:
        importlib.import_module(f"{mod}.{attr}")
      except ImportError:
        missing.append(f"{mod}.{attr}")
  assert not missing, f"{module_name} imports names wsjax does not have: {missing}"


def test_worker_targets_exist():
  # benchmark sides built by name in workers (common.Worker("module:Class"))
  for target in ("benchmarks.throughput:JaxSmall", "benchmarks.throughput:JaxResNet",
                 "benchmarks.throughput:TorchSmall", "benchmarks.study:JaxStudy",
                 "benchmarks.transforms_cost:TransformCosts", "benchmarks.resnet_probe:LaxResNet"):
    module_name, cls = target.split(":")
    assert hasattr(importlib.import_module(module_name), cls), target


def test_unknown_benchmark_is_exit_code_2(capsys):
  assert run_lib.main(["--only=no_such_benchmark"]) == 2
  assert "unknown benchmark no_such_benchmark" in capsys.readouterr().err


LOG = """\
Finished tracing _run_block for jit in 0.250000000 sec
Compiling jit(_run_block) with global shapes and types (ShapedArray(float32[]),).
Finished jaxpr to MLIR module conversion jit(_run_block) in 0.500000000 sec
Finished XLA compilation of jit(_run_block) in 1.250000000 sec
W1129 18:20:00.123456 140 pxla.py:1514] Finished XLA compilation of jit(_evaluate) in 0.125000000 sec
I1129 orbax: something else in 9.0 sec
Finished XLA compilation of jit(_run_block) in 2.000000000 sec
"""


def test_parse_compile_log_counts_and_sums():
  out = core.parse_compile_log(LOG)
  assert out["programs"] == 3
  assert out["compile_s"] == pytest.approx(1.25 + 0.125 + 2.0)
  assert out["trace_s"] == pytest.approx(0.25)
  assert out["lower_s"] == pytest.approx(0.5)
  assert out["by_function"] == {"jit(_run_block)": 2, "jit(_evaluate)": 1}
  assert core.parse_compile_log("no compilation here")["programs"] == 0


def test_run_command_measures_time_exit_code_and_log(tmp_path):
  script = ("import sys, time\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.2: pass\n"
            "print('Finished XLA compilation of jit(f) in 0.5 sec', file=sys.stderr)\n"
            "print('Finished XLA compilation of jit(g) in 0.25 sec', file=sys.stderr)\n"
            "print('a real problem', file=sys.stderr)\n"
            "sys.exit(3)\n")
  r = core.run_command([sys.executable, "-c", script], str(tmp_path), dict(os.environ),
                       str(tmp_path / "logs"))
  assert r["returncode"] == 3
  assert r["programs"] == 2 and r["compile_s"] == pytest.approx(0.75)
  assert r["cpu_s"] >= 0.2
  assert r["wall_s"] >= 0.2
  assert r["peak_rss_mb"] > 1
  assert r["stderr_tail"] == "a real problem"
  assert (tmp_path / "logs" / "stderr.txt").read_text().count("Finished XLA") == 2


def test_before_side_runs_the_baselines_own_programs(tmp_path):
  # A stand-in baseline checkout whose experiment program writes a marker:
  # the run must use it, not this checkout's `experiments` package.
  base = tmp_path / "baseline"
  (base / "experiments").mkdir(parents=True)
  (base / "experiments" / "__init__.py").write_text("")
  (base / "experiments" / "warm_start.py").write_text(
      "import json, os, sys\n"
      "args = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
      "assert args['compilation_cache_dir'] == '' and args['progress'] == 'false'\n"
      "assert os.environ['JAX_LOG_COMPILES'] == '1'\n"
      "print('Finished XLA compilation of jit(x) in 0.5 sec', file=sys.stderr)\n"
      "json.dump({'marker': os.path.abspath(__file__), 'methods': {}},\n"
      "          open(os.path.join(args['workdir'], 'results.json'), 'w'))\n")
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  r = core.run_job("before", str(base), "experiments.warm_start", ["--seeds=1"], str(scratch))
  assert r["results"]["marker"] == str(base / "experiments" / "warm_start.py")
  assert r["programs"] == 1
  assert os.listdir(scratch) == []  # the fresh workdir is removed afterwards
  (base / "experiments" / "warm_start.py").write_text("import sys; sys.exit('broken')\n")
  with pytest.raises(RuntimeError, match="exited with 1"):
    core.run_job("before", str(base), "experiments.warm_start", [], str(scratch))


def _results(n_stages=2, seeds=3):
  stages = [{"n_train": 100 * (i + 1), "train_acc": [0.5 + 0.1 * s for s in range(seeds)],
             "test_acc": [0.4 + 0.01 * s for s in range(seeds)], "steps": [10 + s for s in range(seeds)],
             "epochs": 3, "wall_s": 1.0 + i, "run": f"run_{i}",
             "param_norm": [1.0, 2.0, 3.0][:seeds],
             "dead_relu": {"conv1": [0.0] * seeds, "overall": [0.25] * seeds},
             "dash_cosine_hist": {"overall": [1, 2, 3]}}
            for i in range(n_stages)]
  return {"methods": {m: {"stages": copy.deepcopy(stages)} for m in ("cold", "warm")}}


def test_compare_results_finds_each_difference():
  a = _results()
  b = copy.deepcopy(a)
  for m in ("cold", "warm"):  # wall time and run names are not results
    for s in b["methods"][m]["stages"]:
      s["wall_s"] *= 3
      s["run"] = "other"
  same = core.compare_results(a, b, ("cold", "warm"))
  assert all(c["identical"] and c["diagnostics_identical"] for c in same.values())
  assert same["cold"]["diagnostics_max_abs_diff"] == 0.0

  b["methods"]["warm"]["stages"][1]["test_acc"][2] += 1e-9
  b["methods"]["warm"]["stages"][0]["dead_relu"]["overall"][1] = 0.5
  b["methods"]["warm"]["stages"][1]["dash_cosine_hist"]["overall"][0] = 2
  out = core.compare_results(a, b, ("cold", "warm"))
  assert out["cold"]["identical"]
  assert not out["warm"]["identical"]
  assert out["warm"]["differing"] == ["stage 1 test_acc"]
  assert out["warm"]["diagnostics_identical"] is False
  assert out["warm"]["diagnostics_max_abs_diff"] == pytest.approx(0.25)

  del b["methods"]["cold"]["stages"][1]
  assert core.compare_results(a, b, ("cold",))["cold"]["differing"] == ["2 vs 1 stages"]
  assert not core.compare_results(a, b, ("dash",))["dash"]["identical"]


def test_core_without_baseline_is_a_clear_skip(tmp_path, capsys):
  missing = str(tmp_path / "no-checkout")
  result = core.run(quick=True, baseline=missing)
  assert "git worktree add" in result["skipped"] and missing in result["skipped"]
  assert core.report(result).startswith("skipped: no baseline checkout")
  assert core.main([f"--baseline={missing}", "--quick", f"--out={tmp_path}"]) == 1
  assert not any(name.endswith(".json") for name in os.listdir(tmp_path))
  assert "git worktree add" in capsys.readouterr().out
  not_wsjax = tmp_path / "empty"
  not_wsjax.mkdir()
  assert "not a wsjax checkout" in core.baseline_problem(str(not_wsjax))
  with pytest.raises(ValueError, match="unknown job"):
    core.run(baseline=str(not_wsjax), only=["nope"])


def test_core_jobs_run_the_study_protocol():
  jobs = core.jobs(quick=True)
  assert set(jobs) == {"main", "dash"}
  module, flags, methods = jobs["dash"]
  assert module == "experiments.dash" and methods == ("cold", "warm", "dash")
  assert "--lr=0.01" in flags and "--diagnostics=false" in flags and "--dataset=mnist1d" in flags
  assert "--max_epochs=3" in flags and "--threshold=0" in flags
  assert core.jobs(quick=True)["main"][1] == ["--max_epochs=3", "--threshold=0"]
  assert "--max_epochs=30" in core.jobs(quick=False)["dash"][1]
  assert core.jobs(quick=False)["main"][1] == []            # the main job's defaults
  json.dumps(jobs)  # plain data


def test_git_head_marks_uncommitted_changes(tmp_path):
  import subprocess
  repo = str(tmp_path)
  git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", "-c",
         "commit.gpgsign=false"]
  subprocess.run(git + ["init", "-q"], check=True)
  (tmp_path / "a.py").write_text("x = 1\n")
  subprocess.run(git + ["add", "a.py"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
  head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  (tmp_path / "untracked.py").write_text("")  # untracked files are not the code run
  assert core._git_head(repo) == head
  (tmp_path / "a.py").write_text("x = 2\n")
  assert core._git_head(repo) == head + "+changes"
  assert core._git_head(str(tmp_path / "not-a-repo")) is None
