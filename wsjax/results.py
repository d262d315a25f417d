"""Results: summaries over seeds, the printed table, atomic files.

The schema of `results.json` (shared by every staged experiment):

    {"experiment", "config",
     "environment": {"jax", "backend", "devices", "processes", "seed_devices"},
     "methods": {METHOD: {"stages": [{"n_train", "train_acc": [per seed],
                                      "test_acc": [per seed], "steps": [per seed],
                                      "wall_s", ...}],
                          "final_test_acc": {"mean", "std", "per_seed"}, ...}}}
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Sequence

import jax
import numpy as np


def environment() -> dict:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count(), "processes": jax.process_count()}


def summary(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "per_seed": [float(x) for x in v]}


def summarize_method(stages: list[dict]) -> dict:
  """final test accuracy, mean test accuracy over stages, total steps (over seeds)."""
  test = np.asarray([s["test_acc"] for s in stages])     # (stages, seeds)
  steps = np.asarray([s["steps"] for s in stages])
  return {"final_test_acc": summary(test[-1]),
          "mean_test_acc": summary(test.mean(0)),
          "total_steps": summary(steps.sum(0))}


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `path` via a temporary file and a rename: never half-written."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  rows = [list(map(str, r)) for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  out = [line(headers), line(["-" * w for w in widths])]
  out += [line(r) for r in rows]
  return "\n".join(out)


def pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
  return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def methods_table(results: dict) -> str:
  """method | final test acc | mean test acc | total steps | steps per stage (mean)."""
  rows = []
  for name, m in results["methods"].items():
    per_stage = [int(round(np.mean(s["steps"]))) for s in m["stages"]]
    rows.append([name, pm(m["final_test_acc"]), pm(m["mean_test_acc"]),
                 pm(m["total_steps"], 1.0, 0), " ".join(map(str, per_stage))])
  return format_table(["method", "final test acc %", "mean test acc %", "total steps",
                       "steps per stage (mean over seeds)"], rows)
