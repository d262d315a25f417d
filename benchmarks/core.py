"""The training-core refactor, before and after, side by side.

    git worktree add /tmp/wsjax-644b3fb 644b3fb     # once: the code before the refactor
    python -m benchmarks.core --baseline=/tmp/wsjax-644b3fb [--repeats=3] [--jobs=main,dash]
    python -m benchmarks.core --quick                # short stages (--max_epochs=3 --threshold=0)
    python -m benchmarks.run --only=core --baseline=/tmp/wsjax-644b3fb

Commit 644b3fb is the last one before `wsjax.core` replaced `wsjax.train`
and `wsjax.checkpoint`. Two jobs, each an experiment program run end to end
from the command line, as a user runs it:

* `main`: the main job, `python -m experiments.warm_start` with its defaults
  (MNIST-1D, the 1-D ConvNet, two phases, 5 seeds, Adam lr 3e-3, stages to
  0.99 epoch-mean training accuracy or 200 epochs, cold, warm,
  shrink_perturb and dash, per-stage diagnostics on);
* `dash`: the DASH study protocol of `benchmarks/study.py` through
  `python -m experiments.dash` (MNIST-1D in 10 chunks, the 1-D ConvNet,
  5 seeds, SGD lr 1e-2 momentum 0.9, 0.99 or 30 epochs, cold, warm and
  dash, diagnostics off).

`--quick` caps every stage at 3 epochs (`--max_epochs=3 --threshold=0`).

Sides: "before" runs the baseline checkout (its own `experiments` and
`wsjax`: the working directory and `PYTHONPATH` are the baseline's),
"after" this checkout, with the same Python environment. Every run is a
fresh process with a fresh `--workdir` (the core stores finished runs and
would load them instead of training) and no persistent compilation cache
(`--compilation_cache_dir=`), with `JAX_LOG_COMPILES=1`. The sides
alternate (before, after; then after, before; ...) and report:

* wall time (median of the repeats), CPU time (user + system of the
  process and its threads, from `wait4`), peak resident memory;
* XLA programs compiled: the "Finished XLA compilation" lines JAX logs on
  stderr, and the seconds they report; tracing and lowering ("Finished
  tracing", "Finished jaxpr to MLIR module conversion") summed apart.

Results: the per-seed results of cold, warm and dash (every stage's
training and test accuracy, steps, epochs and buffer size) must be
identical between the sides (the refactor kept them bit-for-bit), and the
diagnostics' largest difference is reported. shrink_perturb's results
changed on purpose after the refactor (commit cddeffd: its fresh draw now
comes from the transform's own key), so only its times are compared.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = "644b3fb"
DEFAULT_BASELINE = os.path.join(tempfile.gettempdir(), f"wsjax-{BASELINE_COMMIT}")
BASELINE_ENV = "WSJAX_BASELINE"

# The per-seed results of a stage that must not change; the diagnostics,
# compared for equality and by their largest difference (the histogram's
# counts only for equality).
RESULT_KEYS = ("n_train", "train_acc", "test_acc", "steps", "epochs")
DIAGNOSTIC_KEYS = ("param_norm", "dist_from_stage_start", "dead_relu")
HISTOGRAM_KEY = "dash_cosine_hist"
CHANGED_ON_PURPOSE = ("shrink_perturb",)

_LOG_LINE = re.compile(r"Finished (XLA compilation of|tracing|jaxpr to MLIR module conversion) "
                       r"(.*?) in ([0-9.eE+-]+) sec")


def jobs(quick: bool) -> dict:
  """name -> (experiment module, its flags, methods whose results must match)."""
  from benchmarks import study
  short = {"max_epochs": 3, "threshold": 0} if quick else {}
  p = {**study.protocol(False), **short}
  dash_flags = [f"--dataset={p['dataset']}", f"--model={p['model']}", f"--chunks={p['n_chunks']}",
                f"--methods={','.join(p['methods'])}", f"--seeds={p['seeds']}",
                "--optimizer=sgd", f"--lr={p['lr']}", f"--momentum={p['momentum']}",
                f"--batch_size={p['batch_size']}", f"--threshold={p['threshold']}",
                f"--max_epochs={p['max_epochs']}", f"--data_seed={p['data_seed']}",
                "--diagnostics=false"]
  main_flags = [f"--{k}={v}" for k, v in short.items()]
  return {"main": ("experiments.warm_start", main_flags, ("cold", "warm", "dash")),
          "dash": ("experiments.dash", dash_flags, tuple(p["methods"]))}


# ---------------------------------------------------------------------------
# One run.

def parse_compile_log(text: str) -> dict:
  """Counts and seconds of the compilation lines `JAX_LOG_COMPILES=1` writes.

  Returns `programs` (the number of "Finished XLA compilation" lines),
  `compile_s` (their seconds), `trace_s` and `lower_s` (tracing, jaxpr to
  MLIR), and `by_function` (programs per function name, most first)."""
  out = {"programs": 0, "compile_s": 0.0, "trace_s": 0.0, "lower_s": 0.0}
  names = collections.Counter()
  for kind, name, seconds in _LOG_LINE.findall(text):
    if kind.startswith("XLA"):
      out["programs"] += 1
      out["compile_s"] += float(seconds)
      names[name] += 1
    elif kind == "tracing":
      out["trace_s"] += float(seconds)
    else:
      out["lower_s"] += float(seconds)
  out["by_function"] = dict(names.most_common())
  return out


def run_command(argv: Sequence[str], cwd: str, env: dict, log_dir: str) -> dict:
  """Runs `argv` to its end; its wall and CPU time, peak memory and
  compilation log (stdout and stderr are kept in `log_dir`)."""
  os.makedirs(log_dir, exist_ok=True)
  out_path, err_path = os.path.join(log_dir, "stdout.txt"), os.path.join(log_dir, "stderr.txt")
  with open(out_path, "wb") as out, open(err_path, "wb") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  with open(err_path, errors="replace") as f:
    stderr = f.read()
  return {"returncode": proc.returncode, "wall_s": wall,
          "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024.0,
          "cache_hits": stderr.count("Persistent compilation cache hit"),
          **parse_compile_log(stderr), "stderr_tail": _tail(stderr)}


def _tail(stderr: str, lines: int = 5) -> str:
  """The last lines of stderr that are not compilation logging."""
  keep = [ln for ln in stderr.splitlines()
          if ln.strip() and "compilation" not in ln and "Finished " not in ln
          and not ln.lstrip().startswith(("Compiling ", "WARNING:jax"))]
  return "\n".join(keep[-lines:])


def side_environment(code_root: str) -> dict:
  """The environment of a side: its checkout first on the path, compile logging on."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([code_root] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  env["JAX_LOG_COMPILES"] = "1"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def run_job(side: str, code_root: str, module: str, flags: Sequence[str], scratch: str) -> dict:
  """One run of `python -m module` from `code_root` in a fresh workdir; adds
  the `results.json` it wrote (as `results`)."""
  workdir = tempfile.mkdtemp(prefix=f"{side}-", dir=scratch)
  argv = [sys.executable, "-m", module, f"--workdir={workdir}", "--compilation_cache_dir=",
          "--progress=false", *flags]
  r = run_command(argv, code_root, side_environment(code_root), os.path.join(workdir, "logs"))
  if r["returncode"] != 0:
    raise RuntimeError(f"{side}: {' '.join(argv[1:])} exited with {r['returncode']}:\n"
                       f"{r['stderr_tail']}")
  with open(os.path.join(workdir, "results.json")) as f:
    r["results"] = json.load(f)
  shutil.rmtree(workdir, ignore_errors=True)
  return r


# ---------------------------------------------------------------------------
# Comparing results.

def _flat(value, prefix=""):
  """Leaves of nested dicts / lists as (path, number)."""
  if isinstance(value, dict):
    for k in sorted(value):
      yield from _flat(value[k], f"{prefix}/{k}")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      yield from _flat(v, f"{prefix}[{i}]")
  else:
    yield prefix, value


def compare_results(a: dict, b: dict, methods: Sequence[str]) -> dict:
  """Per method: whether every stage's `RESULT_KEYS` are equal in the two
  results dicts (`identical`), which are not (`differing`, at most 10);
  whether the diagnostics present in both are equal too
  (`diagnostics_identical`, None without diagnostics) and their largest
  absolute difference."""
  out = {}
  for m in methods:
    ma, mb = a.get("methods", {}).get(m), b.get("methods", {}).get(m)
    if ma is None or mb is None:
      out[m] = {"identical": False, "differing": ["missing on a side"], "stages": None}
      continue
    sa, sb = ma["stages"], mb["stages"]
    differing = [] if len(sa) == len(sb) else [f"{len(sa)} vs {len(sb)} stages"]
    diag, diag_same = None, None
    for i, (x, y) in enumerate(zip(sa, sb)):
      differing += [f"stage {i} {k}" for k in RESULT_KEYS if x.get(k) != y.get(k)]
      for k in (*DIAGNOSTIC_KEYS, HISTOGRAM_KEY):
        if k not in x or k not in y:
          continue
        diag_same = (diag_same is not False) and x[k] == y[k]
        fx, fy = dict(_flat(x[k])), dict(_flat(y[k]))
        if k == HISTOGRAM_KEY or fx.keys() != fy.keys():
          continue
        d = max((abs(float(fx[p]) - float(fy[p])) for p in fx), default=0.0)
        diag = d if diag is None else max(diag, d)
    out[m] = {"identical": not differing, "differing": differing[:10], "stages": len(sa),
              "diagnostics_identical": diag_same, "diagnostics_max_abs_diff": diag}
  return out


# ---------------------------------------------------------------------------
# The benchmark.

def _git_head(path: str) -> Optional[str]:
  """The checkout's commit, with "+changes" when its tracked files differ from it."""
  try:
    head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    changed = subprocess.run(  # read-only: no index refresh, no lock
        ["git", "--no-optional-locks", "-C", path, "status", "--porcelain",
         "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+changes" if changed else "")


def baseline_problem(baseline: str) -> Optional[str]:
  """Why `baseline` cannot be the before side, or None."""
  if not os.path.isdir(baseline):
    return (f"no baseline checkout at {baseline}: create it with `git worktree add {baseline} "
            f"{BASELINE_COMMIT}` (in this repository) or pass --baseline=PATH")
  for needed in ("experiments/warm_start.py", "experiments/dash.py", "wsjax/__init__.py"):
    if not os.path.exists(os.path.join(baseline, needed)):
      return f"{baseline} is not a wsjax checkout with the experiment programs ({needed} missing)"
  return None


def run(quick: bool = False, baseline: Optional[str] = None, repeats: Optional[int] = None,
        only: Sequence[str] = ()) -> dict:
  """Runs the jobs on both sides; see the module docstring."""
  baseline = os.path.abspath(baseline or os.environ.get(BASELINE_ENV) or DEFAULT_BASELINE)
  repeats = repeats or (1 if quick else 3)
  all_jobs = jobs(quick)
  unknown = [j for j in only if j not in all_jobs]
  if unknown:
    raise ValueError(f"unknown job {', '.join(unknown)}; choose from {', '.join(all_jobs)}")
  result = {"benchmark": "core", "environment": common.environment(), "quick": quick,
            "repeats": repeats, "baseline": baseline, "jobs": {}}
  why = baseline_problem(baseline)
  if why:
    result["skipped"] = why
    result["note"] = f"core: skipped: {why}"
    common.log(result["note"])
    return result
  roots = {"before": baseline, "after": ROOT}
  result["commits"] = {side: _git_head(path) for side, path in roots.items()}
  scratch = tempfile.mkdtemp(prefix="wsjax-bench-core-")
  try:
    for name in (only or all_jobs):
      module, flags, methods = all_jobs[name]
      runs = {"before": [], "after": []}
      for r in range(repeats):
        for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
          common.log(f"core: {name} {side} (round {r + 1}/{repeats}) ...")
          time.sleep(0.5)  # let the previous run's threads go idle
          one = run_job(side, roots[side], module, flags, scratch)
          one["load_average_after"] = list(common.load_average())
          runs[side].append(one)
          common.log(f"core: {name} {side} {one['wall_s']:.1f} s, {one['programs']} programs")
      result["jobs"][name] = _summarize(name, module, flags, methods, runs)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return result


def _summarize(name, module, flags, methods, runs) -> dict:
  job = {"command": f"python -m {module} " + " ".join(flags), "methods_checked": list(methods),
         "sides": {}}
  for side, rs in runs.items():
    job["sides"][side] = {
        "wall_s": common.median([r["wall_s"] for r in rs]),
        "wall_s_all": [r["wall_s"] for r in rs],
        "cpu_s": common.median([r["cpu_s"] for r in rs]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        "programs": common.median([r["programs"] for r in rs]),
        "programs_all": [r["programs"] for r in rs],
        "compile_s": common.median([r["compile_s"] for r in rs]),
        "trace_s": common.median([r["trace_s"] for r in rs]),
        "lower_s": common.median([r["lower_s"] for r in rs]),
        "cache_hits": sum(r["cache_hits"] for r in rs),
        "programs_by_function": rs[0]["by_function"],
        "load_average_after": [r["load_average_after"] for r in rs],
        # every repeat of a side gives the same results (else timing compares other work)
        "repeats_identical": all(
            all(c["identical"] for c in compare_results(rs[0]["results"], r["results"],
                                                        methods).values())
            for r in rs[1:]),
        "final_test_acc": {m: v["final_test_acc"]["mean"]
                           for m, v in rs[0]["results"]["methods"].items()}}
  before, after = runs["before"][0]["results"], runs["after"][0]["results"]
  job["results"] = compare_results(before, after, methods)
  job["results_identical"] = all(c["identical"] for c in job["results"].values())
  changed = [m for m in CHANGED_ON_PURPOSE if m in before.get("methods", {})]
  if changed:
    job["changed_on_purpose"] = compare_results(before, after, changed)
  b, a = job["sides"]["before"], job["sides"]["after"]
  job["speedup_wall"] = b["wall_s"] / a["wall_s"]
  job["speedup_cpu"] = b["cpu_s"] / a["cpu_s"]
  return job


def report(result: dict) -> str:
  if result.get("skipped"):
    return f"skipped: {result['skipped']}"
  commits = result.get("commits", {})
  short = {side: c[:7] + ("+changes" if c.endswith("+changes") else "") if c else "?"
           for side, c in ((s, commits.get(s)) for s in ("before", "after"))}
  lines = [f"before: {result['baseline']} ({short['before']}), "
           f"after: {ROOT} ({short['after']}); median of "
           f"{result['repeats']} run(s) per side, no compilation cache"]
  rows = []
  for name, job in result["jobs"].items():
    for side in ("before", "after"):
      s = job["sides"][side]
      rows.append([name, side, s["wall_s"], s["cpu_s"], s["peak_rss_mb"], s["programs"],
                   s["compile_s"], s["trace_s"] + s["lower_s"],
                   f"{job['speedup_wall']:.2f}x" if side == "after" else ""])
  lines.append(common.table(rows, ["job", "side", "wall s", "CPU s", "peak RSS MiB",
                                   "XLA programs", "XLA compile s", "trace+lower s",
                                   "wall before/after"]))
  for name, job in result["jobs"].items():
    same = ", ".join(f"{m} {'identical' if c['identical'] else 'DIFFERENT: ' + '; '.join(c['differing'])}"
                     for m, c in job["results"].items())
    diag = [c for c in job["results"].values() if c.get("diagnostics_identical") is not None]
    line = f"{name}: per-seed results before vs after: {same}"
    if diag:
      line += ("; diagnostics identical" if all(c["diagnostics_identical"] for c in diag) else
               "; diagnostics differ, max |diff| "
               f"{max(c['diagnostics_max_abs_diff'] or 0.0 for c in diag):.2g}")
    for m, c in job.get("changed_on_purpose", {}).items():
      line += (f"; {m} {'identical' if c['identical'] else 'differs'} (changed on purpose "
               "after the refactor: times only)")
    if not all(job["sides"][s]["repeats_identical"] for s in ("before", "after")):
      line += "; WARNING: repeats of a side disagree"
    lines.append(line)
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--baseline", default=None,
                      help=f"checkout of the code before the refactor (default: ${BASELINE_ENV}, "
                      f"else {DEFAULT_BASELINE}; create it with `git worktree add "
                      f"{DEFAULT_BASELINE} {BASELINE_COMMIT}`)")
  parser.add_argument("--quick", action="store_true", help="3 epochs per stage, 1 repeat")
  parser.add_argument("--repeats", type=int, default=None, help="runs per side (default 3, quick 1)")
  parser.add_argument("--jobs", default="", help="comma-separated: main, dash (default both)")
  parser.add_argument("--out", default=common.RESULTS_DIR, help="where core.json goes")
  args = parser.parse_args(argv)
  if args.repeats is not None and args.repeats < 1:
    print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
    return 2
  only = [j.strip() for j in args.jobs.split(",") if j.strip()]
  try:
    result = run(quick=args.quick, baseline=args.baseline, repeats=args.repeats, only=only)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(result))
  if result.get("skipped"):
    return 1
  print(f"wrote {common.write_result('core' + ('_quick' if args.quick else ''), result, args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
