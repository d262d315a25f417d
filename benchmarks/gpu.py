"""ResNet-18 (CIFAR, width 64) training throughput and MFU on a GPU.

    python -m benchmarks.gpu --peak_tflops=989 --peak_tflops_fp32=495 [--batch=256] [--steps=50]
    python -m benchmarks.gpu --allow_cpu --batch=8 --steps=1   # exercise the code on a CPU

Sides, float32 and bfloat16 each: wsjax's jitted `train_step` (bfloat16:
the model's compute dtype, `get_model("resnet18", 10, dtype="bfloat16")`,
mixed precision with float32 parameters, optimizer state and BatchNorm
statistics) and PyTorch eager and `torch.compile` (bfloat16:
`torch.autocast`), both channels-last. FLOPs per step come from XLA's cost
analysis of the wsjax float32 step lowered for the CPU (before
optimization: on a GPU the lowered program has no count and the compiled
one misses the cuDNN convolutions) and are used for every side; MFU =
FLOP/s / the peak of the dtype (`--peak_tflops` for bfloat16,
`--peak_tflops_fp32` for float32, which XLA and cuDNN run as TF32 on
tensor cores by default). Without a GPU (for jax or torch) it says so and
does nothing, unless `--allow_cpu`, which runs every side on the CPU (no
MFU) to check the code path.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common


def _gpu_status() -> str | None:
  """None when both jax and torch see a GPU, else why not (a CPU-only jax or torch)."""
  try:
    import jax
    if jax.default_backend() != "gpu":
      return f"jax's default backend is {jax.default_backend()!r}, not a GPU"
  except Exception as e:  # pragma: no cover
    return f"jax failed to start: {e}"
  if not common.torch_available():
    return "PyTorch is not installed (pip install wsjax[bench])"
  import torch
  if not torch.cuda.is_available():
    return "PyTorch sees no CUDA device"
  return None


def _time(fn, steps: int, sync) -> float:
  for _ in range(3):
    fn()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  sync()
  return (time.perf_counter() - t0) / steps


def _flops(train_step, state, x, y) -> float:
  """XLA's FLOP count of one step, from the program lowered for the CPU
  (before optimization). On a GPU the lowered program has no count and the
  compiled one leaves out the convolutions (cuDNN custom calls)."""
  import jax
  cpu = jax.devices("cpu")[0]
  args = jax.device_put((state, x, y), cpu)
  cost = jax.jit(train_step).lower(*args, {}).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _wsjax(batch: int, steps: int, bf16: bool):
  """Seconds per step and XLA's FLOPs per step of wsjax's ResNet-18 step
  (`wsjax.core.program.make_train_step`, jitted, the state donated)."""
  import jax
  from wsjax.core.optim import OptimizerConfig, make_optimizer
  from wsjax.core.program import make_train_step
  from wsjax.core.state import create_state
  from wsjax.core.task import Task
  from wsjax.models import get_model, make_init_fn
  model = get_model("resnet18", 10, dtype="bfloat16" if bf16 else "float32")
  tx = make_optimizer(OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
  init = make_init_fn(model, (32, 32, 3))
  box = {"s": jax.jit(lambda k: create_state(init, tx, k))(jax.random.PRNGKey(0))}
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
  train_step = make_train_step(model, tx, Task())
  flops = _flops(train_step, box["s"], x, y)
  step = jax.jit(train_step, donate_argnums=(0,))

  def one():
    box["s"], _ = step(box["s"], x, y, {})
  sec = _time(one, steps, lambda: jax.block_until_ready(box["s"]))
  return sec, flops


def _torch(batch: int, steps: int, bf16: bool, compiled: bool, device: str):
  import torch
  from benchmarks import torch_reference as ref
  net = ref.make_model("resnet18").to(device).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
  x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,), device=device)
  fwd = torch.compile(net) if compiled else net
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
      loss = torch.nn.functional.cross_entropy(fwd(x), y)
    loss.backward()
    opt.step()
  return _time(one, steps, sync)


def run(quick: bool = False, peak_tflops: float | None = None, batch: int = 256,
        steps: int = 50, peak_tflops_fp32: float | None = None,
        allow_cpu: bool = False) -> dict:
  result = {"benchmark": "gpu", "environment": common.environment(), "batch": batch,
            "peak_tflops": {"bfloat16": peak_tflops, "float32": peak_tflops_fp32},
            "rows": []}
  why = _gpu_status()
  device = "cuda"
  if why and not allow_cpu:
    result["skipped"] = f"no GPU: {why}; run `python -m benchmarks.gpu --peak_tflops=...` on a GPU machine"
    return result
  if why:
    device, result["cpu_check"] = "cpu", f"no GPU ({why}): every side ran on the CPU"
    result["peak_tflops"] = {"bfloat16": None, "float32": None}
  else:
    import torch
    result["environment"]["gpu"] = torch.cuda.get_device_name()
  steps = 10 if quick else steps
  flops = None
  for dtype in ("float32", "bfloat16"):
    bf16 = dtype == "bfloat16"
    common.log(f"gpu: {dtype} wsjax ...")
    sec, f = _wsjax(batch, steps, bf16)
    flops = flops or f  # the float32 program's count, for every side
    result["rows"].append({"side": "wsjax", "dtype": dtype, "step_s": sec})
    if common.torch_available():
      for compiled in (False, True):
        common.log(f"gpu: {dtype} torch{'.compile' if compiled else ' eager'} ...")
        sec = _torch(batch, steps, bf16, compiled, device)
        result["rows"].append({"side": "torch.compile" if compiled else "torch eager",
                               "dtype": dtype, "step_s": sec})
  result["flops_per_step"] = flops
  for row in result["rows"]:
    peak = result["peak_tflops"][row["dtype"]]
    row["examples_per_s"] = batch / row["step_s"]
    row["tflops"] = flops / row["step_s"] / 1e12
    row["mfu"] = row["tflops"] / peak if peak else None
  return result


def report(result: dict) -> str:
  if result.get("skipped"):
    return result["skipped"]
  rows = [[r["side"], r["dtype"], r["examples_per_s"], r["tflops"],
           None if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in result["rows"]]
  return common.table(rows, ["side", "dtype", "examples/s", "TFLOP/s", "MFU"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the GPU's peak dense bfloat16 TFLOP/s (e.g. H100 SXM: 989)")
  parser.add_argument("--peak_tflops_fp32", type=float, default=None,
                      help="its peak for float32 steps, TF32 tensor cores (e.g. H100 SXM: 495)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--allow_cpu", action="store_true",
                      help="without a GPU, run every side on the CPU (checks the code, no MFU)")
  args = parser.parse_args(argv)
  result = run(peak_tflops=args.peak_tflops, batch=args.batch, steps=args.steps,
               peak_tflops_fp32=args.peak_tflops_fp32, allow_cpu=args.allow_cpu)
  print(report(result))
  if result.get("skipped"):
    return 1
  if result.get("cpu_check"):
    print(result["cpu_check"] + "; not written to results/")
    return 0
  print(f"wrote {common.write_result('gpu', result)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
