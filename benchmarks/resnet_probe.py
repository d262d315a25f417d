"""Why is the wsjax ResNet-18 CPU step slower than PyTorch eager? Variants.

    python -m benchmarks.run --only=resnet_probe

Every variant is the same training step (CIFAR ResNet-18, width 64, batch
128, SGD with momentum, BatchNorm in train mode, float32) and is timed in
its own process, alternating with the unchanged wsjax step ("baseline") and
PyTorch eager, so each variant's ratio to both is measured under the same
load:

* XLA flags: `--xla_cpu_enable_fast_math=true`; `--xla_cpu_use_thunk_runtime=false`
  (the pre-thunk CPU runtime; jax 0.10.2's XLA says the flag is no longer
  supported and ignores it);
* library calls for convolutions (and dots): oneDNN, XNNPACK, YNNPACK via
  `--xla_cpu_experimental_{onednn,xnn,ynn}_fusion_type=`;
* the batch split over 2 CPU devices (wsjax's data parallelism over one
  device per core);
* `jax_default_matmul_precision` "highest" and "bfloat16";
* layout: a plain-`lax` ResNet-18 (no Flax) in NHWC/HWIO and in NCHW/OIHW,
  PyTorch's layout, same parameters, same BatchNorm arithmetic;
* PyTorch with `channels_last` memory format, for reference.
"""
from __future__ import annotations

import time

from benchmarks import common
from benchmarks.throughput import BATCH, LR, MOMENTUM


class LaxResNet:
  """ResNet-18 train step in plain `lax`, in layout NHWC or NCHW."""

  def __init__(self, layout: str = "NCHW", batch: int = BATCH, warmup: int = 2):
    import jax
    import jax.numpy as jnp
    import optax
    from wsjax.models import get_model, make_init_fn

    if layout not in ("NHWC", "NCHW"):
      raise ValueError(f"layout must be NHWC or NCHW, got {layout!r}")
    init_key, _ = jax.random.split(jax.random.PRNGKey(0))  # as create_state
    variables = jax.jit(make_init_fn(get_model("resnet18", 10), (32, 32, 3)))(init_key)
    params, stats = variables["params"], variables["batch_stats"]
    if layout == "NCHW":  # HWIO -> OIHW kernels
      params = jax.tree_util.tree_map_with_path(
          lambda p, v: jnp.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v, params)
    dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
    c_axis = 1 if layout == "NCHW" else 3
    red = tuple(a for a in range(4) if a != c_axis)
    shape = [1, 1, 1, 1]
    shape[c_axis] = -1

    def conv(x, k, stride):
      ksize = k.shape[2] if layout == "NCHW" else k.shape[0]
      pad = ksize // 2
      return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                          dimension_numbers=dn)

    def bn(x, p, s):
      mean = jnp.mean(x, red)
      var = jnp.mean(jnp.square(x - mean.reshape(shape)), red)
      y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + 1e-5)
      y = y * p["scale"].reshape(shape) + p["bias"].reshape(shape)
      new = {"mean": 0.9 * s["mean"] + 0.1 * mean, "var": 0.9 * s["var"] + 0.1 * var}
      return y, new

    def apply(params, stats, x):
      new_stats = {}
      x, new_stats["bn1"] = bn(conv(x, params["conv1"]["kernel"], 1), params["bn1"], stats["bn1"])
      x = jax.nn.relu(x)
      for stage in range(4):
        for block in range(2):
          name = f"layer{stage + 1}_{block}"
          p, s = params[name], stats[name]
          stride = 2 if stage and not block else 1
          ns = {}
          y, ns["bn1"] = bn(conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"])
          y = jax.nn.relu(y)
          y, ns["bn2"] = bn(conv(y, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"])
          if "shortcut_conv" in p:
            x, ns["shortcut_bn"] = bn(conv(x, p["shortcut_conv"]["kernel"], stride),
                                      p["shortcut_bn"], s["shortcut_bn"])
          x = jax.nn.relu(y + x)
          new_stats[name] = ns
      x = jnp.mean(x, red[1:])
      return x @ params["head"]["kernel"] + params["head"]["bias"], new_stats

    tx = optax.sgd(LR, momentum=MOMENTUM)

    def step(carry, x, y):
      params, stats, opt_state = carry

      def loss_fn(params):
        logits, new_stats = apply(params, stats, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    self.carry = (params, stats, tx.init(params))
    in_shape = (batch, 3, 32, 32) if layout == "NCHW" else (batch, 32, 32, 3)
    self.x = jax.random.normal(jax.random.PRNGKey(1), in_shape)
    self.y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
    self.step = jax.jit(step, donate_argnums=(0,))
    self.batch = batch
    self.info = {**common.timed_warmup(self._step, warmup), "layout": layout}

  def _step(self):
    self.carry, loss = self.step(self.carry, self.x, self.y)
    loss.block_until_ready()

  def run(self, n_steps: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(n_steps):
      self._step()
    return {"seconds": time.perf_counter() - t0, "steps": n_steps,
            "examples": n_steps * self.batch}


# name -> (worker target, env, kwargs)
VARIANTS = {
    "fast_math": ("benchmarks.throughput:JaxResNet",
                  {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}, {}),
    "no_thunk_runtime": ("benchmarks.throughput:JaxResNet",
                         {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}, {}),
    "precision_highest": ("benchmarks.throughput:JaxResNet", None,
                          {"matmul_precision": "highest"}),
    "precision_bfloat16": ("benchmarks.throughput:JaxResNet", None,
                           {"matmul_precision": "bfloat16"}),
    "onednn_convolutions": ("benchmarks.throughput:JaxResNet", {"XLA_FLAGS": (
        "--xla_cpu_experimental_onednn_fusion_type="
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")}, {}),
    "xnnpack_convolutions": ("benchmarks.throughput:JaxResNet", {"XLA_FLAGS": (
        "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")}, {}),
    "ynnpack_convolutions": ("benchmarks.throughput:JaxResNet", {"XLA_FLAGS": (
        "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")}, {}),
    "batch_over_2_cpu_devices": ("benchmarks.throughput:JaxResNet", None, {"host_devices": 2}),
    "lax_nhwc": ("benchmarks.resnet_probe:LaxResNet", None, {"layout": "NHWC"}),
    "lax_nchw": ("benchmarks.resnet_probe:LaxResNet", None, {"layout": "NCHW"}),
    "torch_channels_last": ("benchmarks.throughput:TorchResNet", None,
                            {"channels_last": True}),
}


def run(quick: bool = False) -> dict:
  rounds = 1 if quick else 2
  threads = common.cpu_count()
  result = {"benchmark": "resnet_probe", "environment": common.environment(), "batch": BATCH,
            "quick": quick, "rounds_per_variant": rounds, "torch_threads": threads,
            "variants": {}}
  base = common.Worker("benchmarks.throughput:JaxResNet")
  ref = None
  if common.torch_available():
    ref = common.Worker("benchmarks.throughput:TorchResNet", threads=threads)
  try:
    for name, (target, env, kwargs) in VARIANTS.items():
      common.log(f"resnet_probe: {name} ...")
      if "Torch" in target:
        if ref is None:
          continue
        kwargs = {**kwargs, "threads": threads}
      try:
        variant = common.Worker(target, env=env, **kwargs)
      except common.WorkerError as e:
        result["variants"][name] = {"error": str(e)}
        continue
      sides = {"variant": variant, "baseline": base}
      if ref is not None:
        sides["torch_eager"] = ref
      try:
        runs = common.alternate(sides, "run", rounds, 1)
        step_s = {k: common.median([r["seconds"] for r in v]) for k, v in runs.items()}
        result["variants"][name] = {
            "env": env, "kwargs": kwargs, "info": variant.info, "step_s": step_s,
            "variant_over_baseline_speed": step_s["baseline"] / step_s["variant"],
            "variant_over_torch_speed": (step_s["torch_eager"] / step_s["variant"]
                                         if ref is not None else None),
            "baseline_over_torch_speed": (step_s["torch_eager"] / step_s["baseline"]
                                          if ref is not None else None),
            "peak_rss_mb": variant.peak_rss_mb()}
      finally:
        variant.close()
  finally:
    base.close()
    if ref is not None:
      ref.close()
  return result


def report(result: dict) -> str:
  rows = []
  for name, v in result["variants"].items():
    if "error" in v:
      rows.append([name, None, None, None, None, v["error"][:60]])
      continue
    rows.append([name, v["step_s"]["variant"], v["step_s"]["baseline"],
                 v["step_s"].get("torch_eager"), f"{v['variant_over_baseline_speed']:.2f}x",
                 None if v["variant_over_torch_speed"] is None
                 else f"{v['variant_over_torch_speed']:.2f}x"])
  return common.table(rows, ["variant", "variant s/step", "baseline s/step", "torch s/step",
                             "speed vs baseline", "speed vs torch"])
