"""Flags, set-up and error handling shared by the staged experiment programs.

Each program (`warm_start`, `dash`) defines these flags with its own defaults,
turns them into a `StudyConfig`, runs it in `--workdir`, and writes the
printed table, `results.json` and PNG plots. User mistakes (unknown names,
impossible values, unprepared datasets, bad checkpoints, a non-finite loss)
end the program with one line on stderr and exit code 2; set
`WSJAX_DEBUG=1` to see the traceback instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Callable

from absl import flags

FLAGS = flags.FLAGS
USAGE_ERROR = 2


def define_study_flags(**defaults) -> None:
  d = defaults.get
  flags.DEFINE_string("dataset", d("dataset", "mnist1d"), "dataset name (mnist1d, mnist1d_large, digits, cifar10, ...)")
  flags.DEFINE_string("data_dir", None, "tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  flags.DEFINE_string("model", d("model", "conv1d"), "model name (logreg, mlp, conv1d, resnet18, resnet20, vgg16_bn, ...)")
  flags.DEFINE_list("widths", None, "mlp hidden widths, e.g. 100,100")
  flags.DEFINE_integer("channels", None, "conv1d channels")
  flags.DEFINE_integer("width", None, "ResNet base width (resnet18: 64, Ash & Adams' narrow: 16)")
  flags.DEFINE_string("init", None, "initializer: torch, kaiming_normal or flax (default: the model's)")
  flags.DEFINE_string("compute_dtype", None, "resnets, vggs: bfloat16 for mixed precision "
                      "(float32 parameters); default float32")
  flags.DEFINE_string("optimizer", d("optimizer", "adam"), "sgd, adam or adamw")
  flags.DEFINE_float("lr", d("lr", 1e-3), "learning rate")
  flags.DEFINE_float("momentum", d("momentum", 0.9), "SGD momentum")
  flags.DEFINE_float("weight_decay", d("weight_decay", 0.0), "weight decay")
  flags.DEFINE_string("lr_schedule", d("lr_schedule", "constant"), "constant, step, cosine or warmup_cosine (per stage)")
  flags.DEFINE_integer("warmup_steps", 0, "linear learning-rate warm-up steps")
  flags.DEFINE_list("decay_steps", [], "step schedule: steps where lr is multiplied by 0.1")
  flags.DEFINE_integer("batch_size", d("batch_size", 128), "global batch size")
  flags.DEFINE_string("schedule", d("schedule", "two_phase"), "arrival schedule: two_phase, online or chunks")
  flags.DEFINE_float("fraction", d("fraction", 0.5), "two_phase: fraction of the data in the first phase")
  flags.DEFINE_integer("chunk_size", d("chunk_size", 1000), "online: examples added per round")
  flags.DEFINE_integer("chunks", d("chunks", 10), "chunks: number of equal chunks")
  flags.DEFINE_list("methods", d("methods", "cold,warm"), "methods to compare, comma separated")
  flags.DEFINE_integer("seeds", d("seeds", 5), "number of seeds (run side by side, vmapped)")
  flags.DEFINE_integer("seed_offset", 0, "first seed")
  flags.DEFINE_integer("data_seed", 0, "seed of the data arrival order")
  flags.DEFINE_float("threshold", d("threshold", 0.99), "stop a stage at this epoch-mean train accuracy; 0: fixed --max_epochs")
  flags.DEFINE_integer("max_epochs", d("max_epochs", 100), "epoch cap per stage")
  flags.DEFINE_bool("augment", False, "random crop and flip inside the step (images only)")
  flags.DEFINE_integer("block_steps", 32, "steps per compiled call")
  flags.DEFINE_string("workdir", d("workdir", "runs/experiment"), "where checkpoints, results.json and plots go")
  flags.DEFINE_bool("overwrite", False, "replace a workdir that holds a run of another configuration")
  flags.DEFINE_integer("checkpoint_every", 0, "also checkpoint every N steps (0: at stage ends only)")
  flags.DEFINE_string("warm_start_from", None, "start every method from a checkpoint DIR[@STEP]")
  flags.DEFINE_bool("warm_start_opt_state", False, "with --warm_start_from: also restore the optimizer state")
  flags.DEFINE_enum("opt_state", "default", ["default", "keep", "reset"],
                    "optimizer state when a stage continues a model (default: the method's own)")
  flags.DEFINE_enum("bn_stats", "default", ["default", "keep", "reset"],
                    "BatchNorm statistics when a stage continues a model (default: the method's own)")
  flags.DEFINE_float("shrink", 0.4, "shrink_perturb: shrink factor (Ash & Adams)")
  flags.DEFINE_float("perturb", 0.1, "shrink_perturb: weight of the fresh initialization")
  flags.DEFINE_float("sp_shrink", 0.3, "sp: shrink factor (DASH code)")
  flags.DEFINE_float("sp_sigma", 0.01, "sp: std of the Gaussian noise")
  flags.DEFINE_float("dash_lambda", 0.3, "dash: lower clip of the shrink factor")
  flags.DEFINE_float("dash_alpha", 0.3, "dash: EMA weight of the newest chunk's gradient")
  flags.DEFINE_string("dash_granularity", "kernel_slice", "dash: kernel_slice (code) or unit (paper text)")
  flags.DEFINE_integer("dash_max_batch", 512, "dash: examples per gradient batch (the result is the same up to rounding)")
  flags.DEFINE_list("reset_layers", ["head"], "reset: layer names to re-initialize")
  flags.DEFINE_float("l2_init_coef", 1e-2, "l2_init: penalty coefficient")
  flags.DEFINE_bool("diagnostics", True, "record plasticity diagnostics per stage")
  flags.DEFINE_bool("progress", True, "show a progress bar")
  flags.DEFINE_string("compilation_cache_dir", os.path.expanduser("~/.cache/wsjax/xla"),
                      "persistent XLA compilation cache ('' to disable)")
  flags.DEFINE_integer("host_devices", 0, "CPU only: host devices to run on (0: one per core, "
                       "at most --seeds); ignored if XLA_FLAGS sets a device count")
  flags.DEFINE_integer("seed_devices", 0, "device groups the seeds are spread over "
                       "(0: one per device on CPU, 1 on GPU/TPU)")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


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


def setup_jax() -> None:
  """CPU devices, multi-host initialization, the persistent compilation cache."""
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.seed_devices < 0:
    raise ValueError(f"--seed_devices must be >= 0, got {FLAGS.seed_devices}")
  from wsjax import parallel
  parallel.use_cpu_devices(FLAGS.host_devices, at_most=FLAGS.seeds)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def study_config(experiment: str):
  """The `StudyConfig` the flags describe."""
  from wsjax.train import methods as methods_lib
  from wsjax.train.optim import OptimizerConfig
  from wsjax.train.stopping import StoppingRule
  from wsjax.train.study import StudyConfig

  model_kwargs = {}
  if FLAGS.widths:
    model_kwargs["widths"] = tuple(int(w) for w in FLAGS.widths)
  if FLAGS.channels is not None:
    model_kwargs["channels"] = FLAGS.channels
  if FLAGS.width is not None:
    model_kwargs["width"] = FLAGS.width
  if FLAGS.init:
    model_kwargs["init"] = FLAGS.init
  if FLAGS.compute_dtype:
    model_kwargs["dtype"] = FLAGS.compute_dtype
  schedule_kwargs = {"two_phase": {"fraction": FLAGS.fraction},
                     "online": {"chunk_size": FLAGS.chunk_size},
                     "chunks": {"n_chunks": FLAGS.chunks}}.get(FLAGS.schedule)
  if schedule_kwargs is None:
    raise ValueError(f"unknown schedule {FLAGS.schedule!r}; choose two_phase, online or chunks")
  opt = OptimizerConfig(name=FLAGS.optimizer, lr=FLAGS.lr, momentum=FLAGS.momentum,
                        weight_decay=FLAGS.weight_decay, schedule=FLAGS.lr_schedule,
                        warmup_steps=FLAGS.warmup_steps,
                        decay_boundaries=tuple(int(s) for s in FLAGS.decay_steps))
  threshold = FLAGS.threshold if FLAGS.threshold > 0 else None
  return StudyConfig(
      experiment=experiment, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=FLAGS.model,
      model_kwargs=tuple(sorted(model_kwargs.items())), optimizer=opt, batch_size=FLAGS.batch_size,
      schedule=FLAGS.schedule, schedule_kwargs=tuple(sorted(schedule_kwargs.items())),
      methods=tuple(m.strip() for m in FLAGS.methods if m.strip()),
      method_params=methods_lib.method_params_from_flags(FLAGS),
      seeds=FLAGS.seeds, seed_offset=FLAGS.seed_offset, data_seed=FLAGS.data_seed,
      stopping=StoppingRule(threshold=threshold, max_epochs=FLAGS.max_epochs),
      augment=FLAGS.augment, block_steps=FLAGS.block_steps,
      checkpoint_every=FLAGS.checkpoint_every, warm_start_from=FLAGS.warm_start_from,
      warm_start_opt_state=FLAGS.warm_start_opt_state, diagnostics=FLAGS.diagnostics)


def prepare_workdir(workdir: str, config) -> None:
  """Claims `workdir` for `config`; refuses one that holds another run.

  `WORKDIR/config.json` records the configuration's fingerprint. A different
  one is refused unless `--overwrite`, which clears the old run first.
  """
  import jax
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f).get("fingerprint")
    except (OSError, ValueError):
      old = None
    if old != config.fingerprint():
      if not FLAGS.overwrite:
        raise ValueError(f"workdir {workdir} holds a run of a different configuration; "
                         "choose another --workdir or pass --overwrite to replace it")
      if jax.process_index() == 0:
        for name in ("checkpoints", "results.json", "config.json"):
          p = os.path.join(workdir, name)
          shutil.rmtree(p) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
  elif FLAGS.overwrite and os.path.isdir(os.path.join(workdir, "checkpoints")):
    if jax.process_index() == 0:
      shutil.rmtree(os.path.join(workdir, "checkpoints"))
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      from wsjax.results import write_json
      write_json(path, {"fingerprint": config.fingerprint(), "config": config.to_dict()})
    except OSError as e:
      raise ValueError(f"workdir {workdir} cannot be written ({e.strerror}); choose another --workdir")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("workdir ready")


def run_main(body: Callable[[], None]) -> None:
  """Runs `body`, turning user mistakes into one line and exit code 2."""
  from wsjax.checkpoint import CheckpointError
  from wsjax.train.study import Preempted, TrainingDivergedError, request_stop
  signal.signal(signal.SIGTERM, request_stop)
  try:
    body()
  except Preempted as e:
    print(f"preempted: {e}; run the same command to resume", file=sys.stderr)
    sys.exit(143)
  except (ValueError, CheckpointError, TrainingDivergedError) as e:
    if os.environ.get("WSJAX_DEBUG"):
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def standard_plots(out: dict, workdir: str, title: str) -> list[str]:
  """test_accuracy.png and (with diagnostics) diagnostics.png."""
  from wsjax import plotting
  plotting.plot_per_stage(out, os.path.join(workdir, "test_accuracy.png"), title=title)
  names = ["test_accuracy.png"]
  if out["config"]["diagnostics"]:
    plotting.plot_diagnostics(out, os.path.join(workdir, "diagnostics.png"))
    names.append("diagnostics.png")
  return names


def run_study(experiment: str, plots: Callable[[dict, str], list]) -> None:
  """flags -> config -> Study in --workdir -> results.json, plots, table."""
  import jax
  from wsjax import results
  from wsjax.train.study import Study
  setup_jax()
  config = study_config(experiment)
  study = Study(config, FLAGS.workdir, progress=FLAGS.progress,
                seed_devices=FLAGS.seed_devices or None)
  prepare_workdir(FLAGS.workdir, config)
  out = study.run()
  if jax.process_index() == 0:
    results.write_json(os.path.join(FLAGS.workdir, "results.json"), out)
    names = plots(out, FLAGS.workdir)
    print(results.methods_table(out))
    print(f"wrote {FLAGS.workdir}/results.json and {', '.join(names)}")
