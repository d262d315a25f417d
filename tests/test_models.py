"""Tests of wsjax.models: shapes, exact parameter counts, init statistics, BN
modes, sown activations, the registry, and cross-checks against PyTorch
reference networks (skipped when torch is not installed).

Parameter counts and output shapes of the large models come from
`jax.eval_shape` (no compilation); only a few small models are initialized for
real, since XLA:CPU compiles every random draw (~0.1 s per parameter leaf).
"""
import functools
import math

import flax
from flax import linen as nn, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import models
from wsjax.models import initializers, layers

IMAGE = (32, 32, 3)
INPUT_SHAPES = {"conv1d": (40, 1)}


def input_shape(name):
  return INPUT_SHAPES.get(name, IMAGE)


def abstract_variables(model, shape):
  return jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))


# ---------------------------------------------------------------------------
# Parameter counts by hand.

def conv_p(k, cin, cout, bias):
  return k * cin * cout + (cout if bias else 0)


def dense_p(cin, cout):
  return cin * cout + cout


def bn_p(c):
  return 2 * c


def resnet_p(stages, width, classes):
  n = conv_p(9, 3, width, False) + bn_p(width)
  cin = width
  for s, blocks in enumerate(stages):
    c = width * 2**s
    for _ in range(blocks):
      n += 2 * bn_p(c) + conv_p(9, cin, c, False) + conv_p(9, c, c, False)
      if cin != c:  # 1x1 conv + BN shortcut
        n += conv_p(1, cin, c, False) + bn_p(c)
      cin = c
  return n + dense_p(cin, classes)


VGG_PLANS = {  # kuangliu/pytorch-cifar, without the pools
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}


def vgg_p(plan, bn, classes):
  n, cin = 0, 3
  for c in plan:
    n += conv_p(9, cin, c, True) + (bn_p(c) if bn else 0)
    cin = c
  return n + dense_p(512, classes)


def conv8_p(width, classes):
  """Conv8 (learning-transfer): 8 conv3x3 with bias, 4x4 last pool, dense 4w, 4w."""
  chans = [3] + [width * m for m in (1, 1, 2, 2, 4, 4, 8, 8)]
  n = sum(conv_p(9, cin, cout, True) for cin, cout in zip(chans[:-1], chans[1:]))
  return n + dense_p(8 * width, 4 * width) + dense_p(4 * width, 4 * width) + dense_p(4 * width, classes)


def cnn_p(classes, channels=16, widths=(128,), side=32, cin=3):
  """cnn: two 3x3 stride-2 convs with bias (side -> side/2 -> side/4), dense widths, head."""
  n = conv_p(9, cin, channels, True) + conv_p(9, channels, 2 * channels, True)
  fan = (side // 4) ** 2 * 2 * channels
  for w in widths:
    n += dense_p(fan, w)
    fan = w
  return n + dense_p(fan, classes)


def expected_params(name, classes):
  if name == "cnn":
    return cnn_p(classes)
  if name == "conv8":
    return conv8_p(64, classes)
  if name == "logreg":
    return dense_p(3072, classes)
  if name == "mlp":
    return dense_p(3072, 100) + dense_p(100, 100) + dense_p(100, classes)
  if name == "conv1d":
    return (conv_p(5, 1, 32, True) + 2 * conv_p(3, 32, 32, True)
            + dense_p(5 * 32, classes))
  if name == "resnet18":
    return resnet_p((2, 2, 2, 2), 64, classes)
  if name == "resnet20":
    return resnet_p((3, 3, 3), 16, classes)
  return vgg_p(VGG_PLANS[name.removesuffix("_bn")], name.endswith("_bn"), classes)


RELU_SITES = {"logreg": 0, "mlp": 2, "conv1d": 3, "cnn": 3, "resnet18": 17, "resnet20": 19,
              "conv8": 10, "vgg11": 8, "vgg13": 10, "vgg16": 13}


def test_known_models():
  assert set(models.KNOWN_MODELS) == {
      "logreg", "mlp", "conv1d", "cnn", "resnet18", "resnet20", "conv8", "vgg11", "vgg13",
      "vgg16", "vgg11_bn", "vgg13_bn", "vgg16_bn"}


def test_reference_param_counts():
  """Counts quoted for the reference PyTorch networks (10 classes)."""
  def count(name, **kw):
    model = models.get_model(name, 10, **kw)
    return models.count_params(abstract_variables(model, input_shape(name))["params"])
  assert count("conv1d") == 8_010
  assert count("resnet18") == 11_173_962       # kuangliu ResNet18
  assert count("resnet18", width=16) == 701_466  # Ash & Adams' narrow one
  assert count("resnet20") == 272_474         # open_lth cifar_resnet_20
  assert count("vgg16_bn") == 14_728_266       # kuangliu VGG('VGG16')
  assert count("mlp") == 318_410               # 3072-100-100-10


@pytest.mark.parametrize("name", models.KNOWN_MODELS)
def test_shapes_counts_and_structure(name):
  classes = 7
  model = models.get_model(name, classes)
  shape = input_shape(name)
  variables = abstract_variables(model, shape)
  has_bn = name.startswith("resnet") or name.endswith("_bn")
  assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
  assert models.count_params(variables["params"]) == expected_params(name, classes)

  out, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=["activations"]),
      variables, jnp.zeros((3, *shape), jnp.uint8))
  assert out.shape == (3, classes) and out.dtype == jnp.float32
  sown = jax.tree.leaves(state.get("activations", {}))
  assert len(sown) == RELU_SITES[name.removesuffix("_bn")]

  # Structure: kernels keep output units last; BN modules have scale/bias and
  # running mean/var at the same path; the classifier is `head`.
  flat = traverse_util.flatten_dict(variables["params"])
  modules = {}
  for path, leaf in flat.items():
    modules.setdefault(path[:-1], {})[path[-1]] = leaf
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  for path, leaves in modules.items():
    if "kernel" in leaves:
      assert set(leaves) <= {"kernel", "bias"}
      assert leaves["kernel"].ndim in (2, 3, 4)
      if "bias" in leaves:
        assert leaves["bias"].shape == leaves["kernel"].shape[-1:]
    else:
      assert set(leaves) == {"scale", "bias"}, path
      assert stats[path + ("mean",)].shape == leaves["scale"].shape
      assert stats[path + ("var",)].shape == leaves["scale"].shape
  assert modules[(models.HEAD,)]["kernel"].shape[-1] == classes


def test_resnet18_narrow_and_conv1d_options():
  m = models.get_model("resnet18", 10, width=16)
  v = abstract_variables(m, IMAGE)["params"]
  assert v["conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert v["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert v[models.HEAD]["kernel"].shape == (128, 10)
  m = models.get_model("conv1d", 10, channels=8)
  v = abstract_variables(m, (40, 1))["params"]
  assert v["conv1"]["kernel"].shape == (5, 1, 8)
  assert v[models.HEAD]["kernel"].shape == (5 * 8, 10)
  # (N, 40) inputs get a channel axis.
  out = jax.eval_shape(m.apply, {"params": v}, jnp.zeros((2, 40)))
  assert out.shape == (2, 10)
  m = models.get_model("mlp", 3, widths=(20, 30, 40))
  v = abstract_variables(m, (8, 8, 1))["params"]
  assert [v[f"dense{i}"]["kernel"].shape for i in (1, 2, 3)] == [
      (64, 20), (20, 30), (30, 40)]


def test_default_init_schemes():
  for name in models.KNOWN_MODELS:
    expected = "kaiming_normal" if name == "resnet20" else "torch"
    assert models.get_model(name, 10).init_scheme == expected
    for scheme in models.INIT_SCHEMES:
      assert models.get_model(name, 10, init=scheme).init_scheme == scheme


# ---------------------------------------------------------------------------
# Registry errors.

def test_unknown_model():
  with pytest.raises(models.UnknownModelError, match="known models: logreg, mlp"):
    models.get_model("resnet50", 10)
  assert issubclass(models.UnknownModelError, ValueError)


def test_bad_options():
  with pytest.raises(ValueError, match="no option depth"):
    models.get_model("resnet18", 10, depth=34)
  with pytest.raises(ValueError, match="no option batch_norm"):
    models.get_model("vgg16", 10, batch_norm=True)
  with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
    models.get_model("mlp", 10, init="xavier")
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("mlp", 0)
  assert models.model_options("resnet18") == ("stage_sizes", "width", "dtype", "init")
  assert models.model_options("vgg16_bn") == ("dtype", "init")


# ---------------------------------------------------------------------------
# Init statistics on real draws.

def uniform_ok(w, bound):
  """|w| <= bound, mean 0 and variance bound^2/3, within 6 standard errors."""
  w = np.asarray(w, np.float64).ravel()
  n = w.size
  assert np.abs(w).max() <= bound * (1 + 1e-6)
  assert abs(w.mean()) < 6 * bound / math.sqrt(3 * n)
  # Var(u^2) / E(u^2)^2 = 0.8 for a uniform u.
  assert abs(w.var() / (bound**2 / 3) - 1) < 6 * math.sqrt(0.8 / n)


def normal_ok(w, std):
  w = np.asarray(w, np.float64).ravel()
  assert abs(w.mean()) < 6 * std / math.sqrt(w.size)
  assert abs(w.var() / std**2 - 1) < 6 * math.sqrt(2 / w.size)


def layers_of(params):
  """(path, kernel, bias or None) of every Dense/Conv layer."""
  flat = traverse_util.flatten_dict(params)
  return [(p[:-1], k, flat.get(p[:-1] + ("bias",)))
          for p, k in flat.items() if p[-1] == "kernel"]


def bn_layers_of(params):
  flat = traverse_util.flatten_dict(params)
  return [(p[:-1], s, flat[p[:-1] + ("bias",)])
          for p, s in flat.items() if p[-1] == "scale"]


@pytest.mark.parametrize("name,shape", [("mlp", IMAGE), ("conv1d", (40, 1))])
def test_torch_init_statistics(name, shape):
  """PyTorch's default: weights and biases U(+-1/sqrt(fan_in))."""
  params = models.init_variables(models.get_model(name, 10), jax.random.key(1),
                                 shape)["params"]
  normalized_biases = []
  for _, kernel, bias in layers_of(params):
    bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
    uniform_ok(kernel, bound)
    assert np.abs(bias).max() <= bound
    normalized_biases.append(np.asarray(bias).ravel() / bound)
  uniform_ok(np.concatenate(normalized_biases), 1.0)


@pytest.fixture(scope="module")
def resnet20():
  """open_lth's ResNet-20 with its default init, initialized once."""
  model = models.get_model("resnet20", 10)
  return model, models.init_variables(model, jax.random.key(2), IMAGE)


def test_kaiming_normal_init_statistics(resnet20):
  """open_lth: conv/dense weights N(0, 2/fan_in), BN scale U[0,1), offset 0."""
  _, variables = resnet20
  params = variables["params"]
  normalized = []
  for path, kernel, bias in layers_of(params):
    fan_in = math.prod(kernel.shape[:-1])
    std = math.sqrt(2 / fan_in)
    if kernel.size >= 10_000:
      normal_ok(kernel, std)
    normalized.append(np.asarray(kernel).ravel() / std)
    if path == (models.HEAD,):  # PyTorch's default bias, left by open_lth
      uniform_ok(bias, 1 / math.sqrt(fan_in))
    else:
      assert bias is None  # convs without bias
  normal_ok(np.concatenate(normalized), 1.0)
  scales = []
  for _, scale, offset in bn_layers_of(params):
    assert np.all((scale >= 0) & (scale < 1))
    assert np.all(offset == 0)
    scales.append(np.asarray(scale))
  uniform_ok(np.concatenate(scales) * 2 - 1, 1.0)
  for leaf in jax.tree.leaves(variables["batch_stats"]["bn1"]):
    assert leaf.shape == (16,)
  assert np.all(variables["batch_stats"]["bn1"]["mean"] == 0)
  assert np.all(variables["batch_stats"]["bn1"]["var"] == 1)


class ConvBN(nn.Module):
  """A bias-free conv + BN, as in the ResNets, built with wsjax's layer helpers."""
  scheme: str

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.conv(64, 3, x.shape[-1], self.scheme, padding=1, use_bias=False)(x)
    return layers.batch_norm(train, self.scheme)(x)


@pytest.mark.parametrize("scheme", models.INIT_SCHEMES)
def test_conv_batchnorm_init(scheme):
  """Bias-free 3x3 convs and BatchNorm under each scheme."""
  v = ConvBN(scheme).init(jax.random.key(3), jnp.zeros((1, 4, 4, 16)))
  kernel = v["params"]["Conv_0"]["kernel"]
  assert set(v["params"]["Conv_0"]) == {"kernel"}
  scale = np.asarray(v["params"]["BatchNorm_0"]["scale"])
  assert np.all(v["params"]["BatchNorm_0"]["bias"] == 0)
  assert np.all(v["batch_stats"]["BatchNorm_0"]["mean"] == 0)
  assert np.all(v["batch_stats"]["BatchNorm_0"]["var"] == 1)
  fan_in = 3 * 3 * 16
  if scheme == "torch":
    uniform_ok(kernel, 1 / math.sqrt(fan_in))
  elif scheme == "kaiming_normal":
    normal_ok(kernel, math.sqrt(2 / fan_in))
  else:  # Flax's LeCun normal
    normal_ok(kernel, math.sqrt(1 / fan_in))
  if scheme == "kaiming_normal":
    assert np.all((scale >= 0) & (scale < 1)) and 0.3 < scale.mean() < 0.7
  else:
    assert np.all(scale == 1)


def test_flax_init():
  params = models.init_variables(models.get_model("conv1d", 10, init="flax"),
                                 jax.random.key(4), (40, 1))["params"]
  for _path, kernel, bias in layers_of(params):
    assert np.all(bias == 0)
    if kernel.size >= 3000:  # LeCun normal: variance 1/fan_in
      normal_ok(kernel, 1 / math.sqrt(math.prod(kernel.shape[:-1])))
  key = jax.random.key(0)
  assert np.all(initializers.bn_scale_init("flax")(key, (5,)) == 1)
  assert np.all(initializers.bn_scale_init("torch")(key, (5,)) == 1)


def test_initializer_functions():
  key = jax.random.key(5)
  w = initializers.torch_kernel_init(key, (3, 3, 64, 64))
  uniform_ok(w, 1 / math.sqrt(3 * 3 * 64))
  b = initializers.torch_bias_init(50)(key, (20_000,))
  uniform_ok(b, 1 / math.sqrt(50))
  w = initializers.kaiming_normal_kernel_init(key, (200, 300))
  normal_ok(w, math.sqrt(2 / 200))
  s = initializers.uniform_bn_scale_init(key, (20_000,))
  uniform_ok(2 * s - 1, 1.0)
  assert initializers.fan_in((5, 1, 32)) == 5
  with pytest.raises(ValueError, match="unknown init scheme"):
    initializers.kernel_init("he")


# ---------------------------------------------------------------------------
# BatchNorm modes, sown activations, fresh draws.

def test_batchnorm_train_vs_eval(resnet20):
  model, variables = resnet20
  x = jax.random.normal(jax.random.key(6), (4, *IMAGE)) + 0.5
  logits = model.apply(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32

  # Eval mode with a mutable batch_stats collection changes nothing.
  out, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  np.testing.assert_array_equal(out, logits)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"],
               variables["batch_stats"])

  # Train mode needs batch_stats mutable ...
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(variables, x, train=True)
  # ... normalizes with batch statistics and updates the running ones with
  # PyTorch's momentum 0.1: new = 0.9 * old + 0.1 * batch.
  out, new = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda mdl, _: mdl.scope.path == ("conv1",))
  new_stats = new["batch_stats"]
  stem = np.asarray(new["intermediates"]["conv1"]["__call__"][0])
  np.testing.assert_allclose(new_stats["bn1"]["mean"],
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_stats["bn1"]["var"],
                             0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)
  assert not np.allclose(out, logits)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         new_stats, variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_bfloat16_compute_keeps_float32_parameters(name):
  """Mixed precision: a bfloat16 model has the float32 model's parameters
  (same names, shapes, dtype and draws), computes in bfloat16, returns
  float32 logits close to the float32 model's, keeps float32 BatchNorm
  statistics, and trains (finite float32 gradients)."""
  f32 = models.get_model(name, 10)
  bf16 = models.get_model(name, 10, dtype="bfloat16")
  v32 = models.init_variables(f32, jax.random.key(0), IMAGE)
  v16 = models.init_variables(bf16, jax.random.key(0), IMAGE)
  jax.tree.map(np.testing.assert_array_equal, v32, v16)
  assert {x.dtype for x in jax.tree.leaves(v16)} == {jnp.dtype(jnp.float32)}
  x = jax.random.normal(jax.random.key(1), (8, *IMAGE))
  out32, new32 = f32.apply(v32, x, train=True, mutable=["batch_stats", "activations"])
  out16, new16 = bf16.apply(v16, x, train=True, mutable=["batch_stats", "activations"])
  assert out16.dtype == jnp.float32
  acts = jax.tree.leaves(new16["activations"])
  assert acts and all(a.dtype == jnp.bfloat16 for a in acts)
  assert {s.dtype for s in jax.tree.leaves(new16["batch_stats"])} == {jnp.dtype(jnp.float32)}
  scale = float(jnp.abs(out32).max())
  np.testing.assert_allclose(out16, out32, atol=0.1 * scale)
  assert not np.array_equal(out16, out32)

  def loss(params):
    logits, _ = bf16.apply({**v16, "params": params}, x, train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  grads = jax.grad(loss)(v16["params"])
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="unknown compute dtype"):
    models.get_model(name, 10, dtype="int8")
  with pytest.raises(ValueError, match="no option dtype"):
    models.get_model("mlp", 10, dtype="bfloat16")


def test_sown_activations(resnet20):
  model, variables = resnet20
  x = jax.random.normal(jax.random.key(7), (2, *IMAGE))
  logits, state = model.apply(variables, x, mutable=["activations"])
  np.testing.assert_array_equal(logits, model.apply(variables, x))
  acts = state["activations"]
  assert acts["relu"][0].shape == (2, 32, 32, 16)
  assert acts["layer1_0"]["relu1"][0].shape == (2, 32, 32, 16)
  assert acts["layer2_0"]["relu2"][0].shape == (2, 16, 16, 32)
  assert acts["layer3_2"]["relu2"][0].shape == (2, 8, 8, 64)
  leaves = jax.tree.leaves(acts)
  assert len(leaves) == 19
  assert all(np.all(np.asarray(a) >= 0) for a in leaves)
  # Without the mutable collection nothing is sown.
  assert "activations" not in variables


def test_make_init_fn_jit_and_vmap():
  model = models.get_model("logreg", 3)
  init_fn = models.make_init_fn(model, (6,))
  key = jax.random.key(8)
  eager = init_fn(key)
  jitted = jax.jit(init_fn)(key)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)
  assert set(eager) == {"params"}
  assert models.count_params(eager["params"]) == 6 * 3 + 3
  batch = jax.vmap(init_fn)(jax.random.split(key, 3))
  kernels = np.asarray(batch["params"][models.HEAD]["kernel"])
  assert kernels.shape == (3, 6, 3)
  assert not np.array_equal(kernels[0], kernels[1])
  uniform_ok(kernels, 1 / math.sqrt(6))


# ---------------------------------------------------------------------------
# Cross-checks against PyTorch reference networks.

@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  return torch


def torch_refs(torch):
  """PyTorch networks with the layer structure of the reference code
  (kuangliu/pytorch-cifar, JordanAsh/warm_start, open_lth), with modules named
  like wsjax's parameters: `benchmarks.torch_reference`'s definitions."""
  from benchmarks import torch_reference as ref
  ResNet, VGG, Conv1D = ref.ResNet, ref.VGG, ref.Conv1D

  def MLP(classes):
    return ref.MLP(3072, classes)

  vgg16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
  vgg11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
  return {
      "resnet18": lambda: ResNet((2, 2, 2, 2), 16, 10),   # Ash & Adams' width
      "resnet20": lambda: ResNet((3, 3, 3), 16, 10),
      "vgg11_bn": lambda: VGG(vgg11, True, 10),
      "vgg16": lambda: VGG(vgg16, False, 10),
      "conv1d": lambda: Conv1D(32, 10),
      "mlp": lambda: MLP(10),
  }


def torch_to_flax(torch, net, flatten_chw=None):
  """Copies a reference network's weights into wsjax's variable layout.

  `flatten_chw`: (channels, length) of the map the head flattens, whose
  channel-major (PyTorch) order is permuted to wsjax's channels-last order.
  """
  tnn = torch.nn
  params, stats = {}, {}

  def put(tree, path, leaf, value):
    node = tree
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value.detach().numpy())

  for name, mod in net.named_modules():
    path = tuple(name.split("."))
    if isinstance(mod, (tnn.Conv1d, tnn.Conv2d)):
      w = mod.weight  # (out, in, *spatial) -> (*spatial, in, out)
      put(params, path, "kernel", torch.movedim(w, (0, 1), (-1, -2)))
    elif isinstance(mod, tnn.Linear):
      w = mod.weight
      if flatten_chw is not None and name == models.HEAD:
        c, length = flatten_chw
        w = w.reshape(-1, c, length).permute(0, 2, 1).reshape(w.shape[0], -1)
      put(params, path, "kernel", w.T)
    elif isinstance(mod, tnn.BatchNorm2d):
      put(params, path, "scale", mod.weight)
      put(stats, path, "mean", mod.running_mean)
      put(stats, path, "var", mod.running_var)
    else:
      continue
    if getattr(mod, "bias", None) is not None:
      put(params, path, "bias", mod.bias)
  return {"params": params, **({"batch_stats": stats} if stats else {})}


@pytest.mark.parametrize("name", ["conv1d", "mlp", "resnet18", "resnet20",
                                  "vgg11_bn", "vgg16"])
def test_matches_pytorch_reference(torch, name):
  """Same weights, same logits in eval and train mode; same running means."""
  net = torch_refs(torch)[name]()
  kwargs = {"width": 16} if name == "resnet18" else {}
  model = models.get_model(name, 10, **kwargs)
  shape = input_shape(name)
  with torch.no_grad():  # non-trivial BN parameters and statistics
    for mod in net.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_(0, 0.1)
        mod.running_mean.normal_(0, 0.1)
        mod.running_var.uniform_(0.5, 2.0)
  variables = torch_to_flax(torch, net, (32, 5) if name == "conv1d" else None)
  expected = abstract_variables(model, shape)
  assert (jax.tree.map(lambda a: a.shape, variables)
          == jax.tree.map(lambda a: a.shape, expected))

  x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
  if name == "mlp":  # wsjax flattens NHWC: feed the same vector order
    x_torch = torch.from_numpy(x)
  else:
    x_torch = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # NHWC -> NCHW
  net.eval()
  with torch.no_grad():
    want = net(x_torch).numpy()
  got = model.apply(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if "batch_stats" not in variables:
    return
  net.train()
  with torch.no_grad():
    want = net(x_torch).numpy()
  got, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  # Running means agree (running variances differ by Bessel's factor n/(n-1):
  # PyTorch updates them with the unbiased batch variance, Flax the biased).
  want = traverse_util.flatten_dict(torch_to_flax(torch, net)["batch_stats"])
  got = traverse_util.flatten_dict(state["batch_stats"])
  for path in want:
    if path[-1] == "mean":
      np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5)


def test_init_bounds_match_pytorch(torch):
  """wsjax's torch init draws from PyTorch's default distributions."""
  tnn = torch.nn
  cases = [(tnn.Linear(3072, 100), (3072, 100)),
           (tnn.Conv2d(16, 32, 3), (3, 3, 16, 32)),
           (tnn.Conv1d(1, 32, 5), (5, 1, 32))]
  key = jax.random.key(9)
  for layer, shape in cases:
    w = layer.weight.detach().numpy()
    bound = 1 / math.sqrt(initializers.fan_in(shape))
    assert w.size == math.prod(shape)
    uniform_ok(w, bound)
    assert np.abs(w).max() > 0.9 * bound
    uniform_ok(layer.bias.detach().numpy(), bound)
    ours = np.asarray(initializers.torch_kernel_init(key, shape))
    q = [0.01, 0.25, 0.5, 0.75, 0.99]
    np.testing.assert_allclose(np.quantile(ours, q), np.quantile(w, q),
                               atol=0.1 * bound)
  w = torch.empty(64, 16, 3, 3)
  torch.nn.init.kaiming_normal_(w)
  ours = initializers.kaiming_normal_kernel_init(key, (3, 3, 16, 64))
  np.testing.assert_allclose(np.std(ours), w.std().item(), rtol=0.1)
  np.testing.assert_allclose(np.std(ours), math.sqrt(2 / 144), rtol=0.05)


@pytest.mark.parametrize("k,s,p", [(5, 2, 2), (3, 2, 1), (3, 1, 0)])
def test_conv1d_patches_equals_lax_convolution(k, s, p):
  """The matmul form of the 1-D conv gives nn.Conv's result on the same params."""
  from wsjax.models import layers
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 20, 3))
  patches = layers.Conv1DPatches(7, k, 3, "torch", strides=s, padding=p)
  variables = patches.init(jax.random.PRNGKey(1), x)
  reference = layers.conv(7, k, 3, "torch", ndim=1, strides=s, padding=p)
  got = patches.apply(variables, x)
  want = reference.apply(variables, x)
  assert got.shape == want.shape == (4, (20 + 2 * p - k) // s + 1, 7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (5, 2, 0)])
def test_conv2d_patches_equals_lax_convolution(k, s, p):
  """The cnn's matmul form of the 2-D conv gives nn.Conv's result on the same
  params (odd side 13 checks the output size with stride 2)."""
  from wsjax.models.cnn import Conv2DPatches
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 13, 13, 3))
  patches = Conv2DPatches(7, k, 3, "torch", strides=s, padding=p)
  variables = patches.init(jax.random.PRNGKey(1), x)
  reference = layers.conv(7, k, 3, "torch", strides=s, padding=p)
  got = patches.apply(variables, x)
  want = reference.apply(variables, x)
  side = (13 + 2 * p - k) // s + 1
  assert got.shape == want.shape == (4, side, side, 7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cnn_on_28x28_images(torch):
  """cnn on Fashion-MNIST-sized inputs: the count of its docstring, the
  options, and the same logits as the same network in PyTorch (Conv2d
  stride 2 padding 1, NCHW flatten permuted to NHWC)."""
  model = models.get_model("cnn", 10)
  variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
  assert models.count_params(variables["params"]) == cnn_p(10, side=28, cin=1) == 206_922
  small = models.get_model("cnn", 3, channels=4, widths=())
  v = abstract_variables(small, (28, 28, 1))["params"]
  assert v["conv2"]["kernel"].shape == (3, 3, 4, 8) and v["head"]["kernel"].shape == (7 * 7 * 8, 3)
  assert models.model_options("cnn") == ("channels", "widths", "dtype", "custom_grad", "init")
  assert models.model_options("conv1d") == ("channels", "custom_grad", "init")
  tnn = torch.nn
  net = tnn.Sequential(tnn.Conv2d(1, 16, 3, 2, 1), tnn.ReLU(), tnn.Conv2d(16, 32, 3, 2, 1),
                       tnn.ReLU(), tnn.Flatten(), tnn.Linear(32 * 7 * 7, 128), tnn.ReLU(),
                       tnn.Linear(128, 10))
  convs = [m for m in net if isinstance(m, tnn.Conv2d)]
  denses = [m for m in net if isinstance(m, tnn.Linear)]
  np_ = lambda t: jnp.asarray(t.detach().numpy())  # noqa: E731
  params = {f"conv{i}": {"kernel": np_(c.weight.permute(2, 3, 1, 0)), "bias": np_(c.bias)}
            for i, c in enumerate(convs, start=1)}
  w1 = denses[0].weight.reshape(128, 32, 7, 7).permute(0, 2, 3, 1).reshape(128, -1)  # CHW -> HWC
  params["dense1"] = {"kernel": np_(w1.T), "bias": np_(denses[0].bias)}
  params[models.HEAD] = {"kernel": np_(denses[1].weight.T), "bias": np_(denses[1].bias)}
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
  got, state = model.apply({"params": params}, x, mutable=["activations"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert [a[0].shape for a in state["activations"].values()] == [(3, 14, 14, 16), (3, 7, 7, 32),
                                                                  (3, 128)]


@pytest.mark.parametrize("layer", ["conv1d", "conv2d"])
def test_patch_conv_custom_gradient_equals_autodiff_of_nn_conv_under_vmap(layer):
  """The patch convolutions' hand-written backward pass (`layers.patch_matmul`)
  gives nn.Conv's autodiff gradients, for one replica and vmapped over
  replicas with their own kernels. Hessian-vector products forward-over-reverse
  and reverse-over-reverse agree; forward mode through the output itself
  needs `custom_grad=False`."""
  from wsjax.models.cnn import Conv2DPatches
  shape, ndim = ((6, 20, 3), 1) if layer == "conv1d" else ((6, 9, 9, 3), 2)
  make = (lambda g: layers.Conv1DPatches(5, 3, 3, "torch", strides=2, padding=1, custom_grad=g)
          ) if ndim == 1 else (lambda g: Conv2DPatches(5, 3, 3, "torch", strides=2, padding=1,
                                                         custom_grad=g))
  reference = layers.conv(5, 3, 3, "torch", ndim=ndim, strides=2, padding=1)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  params = jax.vmap(lambda k: make(True).init(k, x))(keys)

  def loss(module, p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)) * jnp.arange(5.0))

  grad_ref = jax.jit(jax.vmap(jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1)),
                              in_axes=(0, None)))(params, x)
  for custom in (True, False):
    module = make(custom)
    fn = jax.grad(functools.partial(loss, module), argnums=(0, 1))
    for got, want in zip(jax.tree.leaves(jax.jit(jax.vmap(fn, in_axes=(0, None)))(params, x)),
                         jax.tree.leaves(grad_ref)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    one = jax.tree.map(lambda a: a[1], params)
    for got, want in zip(jax.tree.leaves(fn(one, x)),
                         jax.tree.leaves(jax.tree.map(lambda a: a[1], grad_ref))):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  one = jax.tree.map(lambda a: a[0], params)
  v = jax.tree.map(jnp.ones_like, one)
  g_plain = jax.grad(lambda p: loss(make(False), p, x))
  fwd_over_rev = jax.jvp(g_plain, (one,), (v,))[1]
  g_custom = jax.grad(lambda p: loss(make(True), p, x))
  rev_over_rev = jax.grad(lambda p: sum(jnp.vdot(a, b) for a, b in zip(
      jax.tree.leaves(g_custom(p)), jax.tree.leaves(v))))(one)
  for a, b in zip(jax.tree.leaves(fwd_over_rev), jax.tree.leaves(rev_over_rev)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.jvp(g_custom, (one,), (v,))[1]),
                  jax.tree.leaves(fwd_over_rev)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  out = jax.jvp(lambda p: make(False).apply(p, x), (one,), (v,))[1]
  assert out.shape[0] == shape[0]
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda p: make(True).apply(p, x), (one,), (v,))
