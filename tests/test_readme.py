"""README's "write your own study" example runs as written (in a fresh
directory, on the shared data dir), and its second run loads the stored runs."""
import os
import re
import subprocess
import sys

from conftest import REPO


def _example() -> str:
  text = open(os.path.join(REPO, "README.md")).read()
  m = re.search(r"<!-- example: write your own study -->\s*```python\n(.*?)```", text, re.S)
  assert m, "README lost its example block"
  return m.group(1)


def test_the_readme_example_runs_and_reruns_from_the_store(data_dir, tmp_path):
  code = _example()
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  runs = []
  for _ in range(2):
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs.append(p.stdout)
  # the example's own lines (a first build of the dataset may print sizes too)
  lines = [line for line in runs[0].splitlines() if "test accuracy" in line]
  accs = [float(x) for line in lines for x in re.findall(r"\d\.\d+", line)]
  assert len(accs) == 6 and all(0.3 < a <= 1 for a in accs)  # well above chance (0.1)
  assert lines == [line for line in runs[1].splitlines() if "test accuracy" in line]  # loaded, identical
  assert len(os.listdir(tmp_path / "runs" / "my_study" / "runs")) == 2
