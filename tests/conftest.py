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
