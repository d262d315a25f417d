"""What every experiment program shares: flags generated from its config,
JAX set-up, one-line errors, writing results.

A program is a default config (a frozen dataclass tree, see `wsjax.config`)
plus a body:

    DEFAULT = StagedConfig(...)
    common.define_flags(DEFAULT, workdir="runs/warm_start")
    ...
    cfg = common.config_from_flags(StagedConfig)

Every field of the config becomes a flag with the config's default (so a
config and its flags cannot drift apart; `--helpfull` lists only what the
study uses), plus the program flags below (workdir, devices, multi-host,
the compilation cache) and the runner's operational knobs. User mistakes
(unknown names, impossible values, unprepared datasets, bad snapshots, a
non-finite loss) end the program with one line on stderr and exit code 2;
set `WSJAX_DEBUG=1` to see the traceback instead.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from absl import flags

from wsjax import config as config_lib

FLAGS = flags.FLAGS
USAGE_ERROR = 2


def define_flags(default_config, *, workdir: str, runner=None) -> None:
  """Flags for every field of `default_config` and of the runner config
  (`runner=False`: a program that trains nothing has none), and the program
  flags."""
  from wsjax.studies.common import RunnerConfig
  config_lib.define_flags(default_config, FLAGS)
  if runner is not False:
    config_lib.define_flags(runner or RunnerConfig(), FLAGS)
  flags.DEFINE_string("workdir", workdir, "where runs, results.json and plots go")
  if runner is False:
    return
  flags.DEFINE_string("compilation_cache_dir", os.path.expanduser("~/.cache/wsjax/xla"),
                      "persistent XLA compilation cache ('' to disable)")
  flags.DEFINE_integer("host_devices", 0, "CPU only: host devices to run on (0: one per core, "
                       "at most the replicas); ignored if XLA_FLAGS sets a device count")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def config_from_flags(cls, **fixed):
  """The config the flags describe (`fixed` overrides fields that are not flags)."""
  cfg = config_lib.from_flags(cls, FLAGS)
  return config_lib.replace(cfg, **fixed) if fixed else cfg


def runner_from_flags():
  from wsjax.studies.common import RunnerConfig
  return config_lib.from_flags(RunnerConfig, FLAGS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, but a bad flag is one line and exit code 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}; see --helpfull for the flags", file=sys.stderr)
    sys.exit(USAGE_ERROR)
  if len(rest) > 1:
    print(f"error: unexpected arguments {' '.join(rest[1:])}; flags look like --name=value",
          file=sys.stderr)
    sys.exit(USAGE_ERROR)
  return rest


def setup_jax(replicas: int) -> None:
  """CPU devices (one per core, at most `replicas`), multi-host
  initialization, the persistent compilation cache."""
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from wsjax import parallel
  parallel.use_cpu_devices(FLAGS.host_devices, at_most=replicas)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_main(body: Callable[[], None]) -> None:
  """Runs `body`, turning user mistakes into one line and exit code 2."""
  from wsjax.core.hooks import request_stop
  from wsjax.core.loop import Preempted, TrainingDivergedError
  signal.signal(signal.SIGTERM, request_stop)
  try:
    body()
  except Preempted as e:
    print(f"preempted: {e}; run the same command to resume", file=sys.stderr)
    sys.exit(143)
  except (ValueError, TrainingDivergedError) as e:
    if os.environ.get("WSJAX_DEBUG"):
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def check_workdir(workdir: str) -> None:
  """A workdir that cannot be written is a one-line error before any work."""
  import jax
  if jax.process_index() != 0:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write-test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {workdir} cannot be written ({e.strerror}); choose another "
                     "--workdir") from None


def write_results(workdir: str, study_id: str, out: dict,
                  plots: Callable[[dict, str], list[str]]) -> list[str]:
  """results.json and plots into `workdir/studies/<study_id>/` (kept for
  good: another configuration never overwrites them) and copies at the top
  of `workdir` (the latest study). Process 0 only. Returns the plot names."""
  import shutil

  import jax
  from wsjax import results
  if jax.process_index() != 0:
    return []
  out = {**out, "study": study_id}
  home = os.path.join(workdir, "studies", study_id)
  os.makedirs(home, exist_ok=True)
  results.write_json(os.path.join(home, "results.json"), out)
  names = plots(out, home)
  for name in ["results.json", *names]:
    tmp = os.path.join(workdir, f".{name}.tmp")
    shutil.copyfile(os.path.join(home, name), tmp)
    os.replace(tmp, os.path.join(workdir, name))
  return names


def given_flags() -> list[str]:
  """Names of the flags set on the command line (presets fill the others)."""
  return [name for name in FLAGS if FLAGS[name].present]


def run_study(cfg, make_study: Callable, study_id: str, replicas: int,
              table: Callable[[dict], str], plots: Callable[[dict, str], list[str]]) -> dict:
  """The body every study program shares: validate the config, lay the
  devices out for `replicas`, run `make_study(cfg, workdir, runner)` in
  `--workdir`, write results.json and the plots, print the table. Returns
  the study's results."""
  runner = runner_from_flags()
  cfg.validate()  # before the devices are laid out, so a bad config is one line
  setup_jax(replicas)
  study = make_study(cfg, FLAGS.workdir, runner)
  check_workdir(FLAGS.workdir)
  out = study.run()
  names = write_results(FLAGS.workdir, study_id, out, plots)
  if names:
    print(table(out))
    print(f"wrote {FLAGS.workdir}/results.json and {', '.join(names)}")
  return out
