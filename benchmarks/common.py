"""Shared machinery of the benchmarks: worker processes, timing, tables.

Each side of a comparison (wsjax, PyTorch) lives in its own worker process,
so that its peak resident memory (`ru_maxrss`) is its own and the two
frameworks' thread pools never share a process. The driver alternates calls
to the workers (wsjax, torch, wsjax, torch, ...) after warm-up, so both see
the same background load on a shared machine, and reports medians.

A worker is a class named by "module:Class"; the driver builds it in a
spawned process (`Worker`), its constructor does the set-up (and reports how
long it took), and its methods are called by name.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_count() -> int:
  """Cores this process may run on (the affinity mask, not the host's total)."""
  from wsjax import parallel
  return parallel.cpu_cores()


def peak_rss_mb() -> float:
  """This process's peak resident set size in MiB (Linux: ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
  """User + system CPU time of this process so far (all its threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def load_average() -> tuple[float, float, float]:
  return os.getloadavg()


def environment() -> dict:
  """Versions and machine facts recorded with every result."""
  env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
         "machine": platform.machine(), "processor": _cpu_model(), "cores": cpu_count(),
         "load_average_start": list(load_average()),
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for package in ("jax", "jaxlib", "flax", "optax", "torch"):  # without importing them
    try:
      env[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      env[package] = None
  return env


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def median(values):
  return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------
# Worker processes.

def _serve(conn, target: str, kwargs: dict) -> None:
  """Worker main loop: build `target(**kwargs)`, then answer method calls."""
  try:
    module_name, class_name = target.split(":")
    module = __import__(module_name, fromlist=[class_name])
    t0 = time.perf_counter()
    obj = getattr(module, class_name)(**kwargs)
    conn.send(("ok", {"setup_s": time.perf_counter() - t0,
                      "info": getattr(obj, "info", {})}))
  except BaseException as e:  # report and exit
    conn.send(("error", _describe(e)))
    return
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    method, args = msg
    try:
      if method == "peak_rss_mb":
        result = peak_rss_mb()
      else:
        result = getattr(obj, method)(*args)
      conn.send(("ok", result))
    except BaseException as e:
      conn.send(("error", _describe(e)))


def _describe(e: BaseException) -> dict:
  return {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


class WorkerError(RuntimeError):
  """A worker raised; `kind` is the exception's type name."""

  def __init__(self, info: dict):
    super().__init__(f"{info['type']}: {info['message']}")
    self.kind = info["type"]
    self.traceback = info["traceback"]


@contextlib.contextmanager
def _environ(extra: Optional[dict]):
  saved = {k: os.environ.get(k) for k in (extra or {})}
  os.environ.update(extra or {})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


class Worker:
  """A benchmark side in a spawned process.

  `Worker("benchmarks.throughput:JaxSide", env={...}, model="mlp")` builds
  the object in the child (with `env` added to its environment, e.g.
  XLA_FLAGS); `call(name, *args)` runs a method there and returns its
  result; `setup_s` is how long the constructor took.
  """

  def __init__(self, target: str, env: Optional[dict] = None, **kwargs):
    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.target = target
    with _environ(env):
      self.proc = ctx.Process(target=_serve, args=(child, target, kwargs), daemon=True)
      self.proc.start()
    child.close()
    out = self._recv()
    self.setup_s = out["setup_s"]
    self.info = out["info"]

  def _recv(self):
    try:
      status, payload = self.conn.recv()
    except EOFError:
      self.proc.join(5)
      raise RuntimeError(f"worker {self.target} died (exit code {self.proc.exitcode})") from None
    if status == "error":
      self.close()
      raise WorkerError(payload)
    return payload

  def call(self, method: str, *args) -> Any:
    self.conn.send((method, args))
    return self._recv()

  def peak_rss_mb(self) -> float:
    return self.call("peak_rss_mb")

  def close(self) -> None:
    if self.proc.is_alive():
      try:
        self.conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      self.proc.join(10)
      if self.proc.is_alive():
        self.proc.terminate()
        self.proc.join(5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@contextlib.contextmanager
def closing_all(workers: dict):
  """`with closing_all(sides):` closes every worker on the way out."""
  try:
    yield workers
  finally:
    for w in workers.values():
      w.close()


def timed_warmup(step, n: int) -> dict:
  """Runs `step()` n times; the first call's time minus the last's is the
  compilation (reported separately, never hidden in a measurement)."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  if not times:
    return {"first_call_s": None, "warm_call_s": None, "compile_s": None}
  return {"first_call_s": times[0], "warm_call_s": times[-1],
          "compile_s": max(times[0] - times[-1], 0.0)}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def alternate(workers: dict, method: str, rounds: int, *args, pause_s: float = 0.2) -> dict:
  """Calls `method` on every worker in turn, `rounds` times; results by name.

  The order rotates each round (A B C, B C A, ...) so that no side always
  runs right after the same other side.
  """
  names = list(workers)
  out = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      time.sleep(pause_s)  # let the previous side's spinning threads go idle
      out[n].append(workers[n].call(method, *args))
  return out


# ---------------------------------------------------------------------------
# Output.

def table(rows: list[list[Any]], header: list[str]) -> str:
  """A plain fixed-width table."""
  cells = [[_fmt(c) for c in row] for row in [header] + rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(c) -> str:
  if isinstance(c, float):
    if c != c:
      return "-"
    if abs(c) >= 1000:
      return f"{c:,.0f}"
    if abs(c) >= 10:
      return f"{c:.1f}"
    return f"{c:.3g}" if abs(c) < 1 else f"{c:.2f}"
  return "-" if c is None else str(c)


def write_result(name: str, result: dict, out_dir: str = RESULTS_DIR) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=float)
    f.write("\n")
  return path


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
