"""Shared test set-up: a persistent XLA cache speeds repeated compiles."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir per session, where the local datasets get built."""
  path = os.environ.get("WSJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  return path


def run_cli(module, *args, env=None, timeout=600, devices=None):
  """Runs `python -m module args...` as a real subprocess; returns CompletedProcess."""
  import subprocess
  e = dict(os.environ)
  e.pop("XLA_FLAGS", None)
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["PYTHONUNBUFFERED"] = "1"
  e.update(env or {})
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout)


def toy_setting(data_dir, *, model="mlp", seeds=(0, 1), optimizer=None, batch_size=64,
                block_steps=8, dataset="mnist1d", **model_options):
  """The shared toy: a small model on MNIST-1D (or digits) for a stack of
  replicas, as a `wsjax.studies.common.Setting` (model, data on device,
  optimizer, fresh states, compiled programs)."""
  from wsjax.core.optim import OptimizerConfig
  from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting
  if model == "mlp" and "widths" not in model_options:
    model_options["widths"] = (16,)
  return Setting(ModelConfig(name=model, **model_options),
                 DataConfig(dataset=dataset, data_dir=data_dir, batch_size=batch_size),
                 optimizer or OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), seeds,
                 RunnerConfig(block_steps=block_steps, progress=False, seed_devices=1))


def stored_runs(workdir, what):
  """Run directories of a workdir holding `what`: DONE, or a checkpoint of a
  run not yet finished (a finished run deletes its checkpoints just after
  writing DONE, so a checkpoint beside DONE is not mid-run)."""
  runs = workdir / "runs"
  if not runs.is_dir():
    return []
  if what == "checkpoint":
    return [d for d in runs.iterdir()
            if (d / "checkpoints").is_dir() and not (d / "DONE").exists()
            and any(c.name.isdigit() for c in (d / "checkpoints").iterdir())]
  return [d for d in runs.iterdir() if (d / what).exists()]
