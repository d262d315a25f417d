"""Tests of permutation specs (wsjax.models.permutation_specs), applying and
inverting permutations (wsjax.transfer.permutation), and the Conv8 model.

The first property: a permuted network computes exactly the same function,
for every model with a spec, in eval mode and (BatchNorm) train mode.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import models, tree
from wsjax.models import permutation_specs
from wsjax.transfer import (Flattened, PermutationSpec, apply_permutation, compose,
                            identity_perms, invert, random_perms)
from wsjax.transforms import groups

IMAGE = (32, 32, 3)

# (registry name, options, input shape): small widths, every spec'd family.
CASES = [
    ("mlp", {"widths": (16, 12)}, (8, 8, 1)),
    ("conv1d", {"channels": 6}, (40, 1)),
    ("resnet18", {"width": 4}, IMAGE),
    ("resnet20", {"width": 4}, IMAGE),
    ("vgg11", {}, IMAGE),
    ("vgg11_bn", {}, IMAGE),
    ("conv8", {"width": 4}, IMAGE),
    ("conv8", {"width": 4, "last_pool": 2}, IMAGE),  # flatten sees 2x2 positions
]


def abstract(name, shape, **options):
  model = models.get_model(name, 10, **options)
  return model, jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))


def nontrivial_variables(model, shape, seed):
  """Random variables for `model` drawn with numpy (XLA:CPU compiles jax's
  random draws slowly): He-scaled kernels, non-zero biases, and BatchNorm
  scale/offset and running statistics away from 1/0 (else permuting them
  would be invisible)."""
  shapes = jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))
  roles = groups.classify(shapes)
  rng = np.random.default_rng(seed)

  def draw(name, s):
    if name.endswith("/var"):
      w = rng.uniform(0.5, 2.0, s.shape)
    elif roles[name] == groups.NORM_SCALE:
      w = rng.uniform(0.5, 1.5, s.shape)
    elif roles[name] == groups.KERNEL:
      w = rng.normal(size=s.shape) * np.sqrt(2.0 / math.prod(s.shape[:-1]))
    else:  # biases, BatchNorm offsets and running means
      w = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(w, s.dtype)
  return tree.map_named(draw, shapes)


def numpy_permutation(spec, perms, variables):
  """Brute-force reference of apply_permutation: explicit index lists,
  Flattened axes expanded to (o * n + perm[i]) * inner + r."""
  def f(name, w):
    w = np.asarray(w)
    for axis, entry in enumerate(spec.axes[name]):
      if entry is None:
        continue
      flat = entry if isinstance(entry, Flattened) else Flattened(entry)
      p = np.asarray(perms[flat.perm])
      index = [(o * len(p) + p[i]) * flat.inner + r for o in range(flat.outer)
               for i in range(len(p)) for r in range(flat.inner)]
      w = w.take(index, axis=axis)
    return w
  return tree.map_named(f, variables)


# ---------------------------------------------------------------------------
# Specs: coverage, structure, errors.

@pytest.mark.parametrize("name", permutation_specs.SPEC_MODELS)
def test_spec_covers_exactly_the_leaves_of_every_model(name):
  shape = (40, 1) if name == "conv1d" else IMAGE
  _, variables = abstract(name, shape)
  axes = models.permutation_spec(name, variables)
  assert set(axes) == set(tree.names(variables))
  for leaf, value in tree.named_leaves(variables):
    assert len(axes[leaf]) == value.ndim
  spec = PermutationSpec.for_model(name, variables)
  # The first layer's input and the head's output are never permuted.
  first = [n for n in axes if n.endswith("/kernel")][0]
  assert axes[first][-2] is None
  assert axes["head/kernel"][-1] is None and axes["head/bias"] == (None,)
  # Every permutation touches a kernel's output axis and a kernel's input
  # axis; BatchNorm statistics move with their units (the scale's permutation).
  for where in spec.perms.values():
    assert any(leaf.endswith("kernel") and axis == len(axes[leaf]) - 1 for leaf, axis in where)
    assert any(leaf.endswith("kernel") and axis == len(axes[leaf]) - 2 for leaf, axis in where)
  for n in axes:
    if n.startswith("batch_stats/"):
      scale = n.removeprefix("batch_stats/").rsplit("/", 1)[0] + "/scale"
      assert axes[n] == axes[scale] and axes[n][0] is not None


def test_spec_structure_by_hand():
  _, v = abstract("conv1d", (40, 1), channels=6)
  axes = models.permutation_spec("conv1d", v)
  assert axes["conv2/kernel"] == (None, "conv1", "conv2")
  assert axes["head/kernel"] == (Flattened("conv3", outer=5), None)  # 40 -> 20 -> 10 -> 5
  _, v = abstract("resnet20", IMAGE, width=4)
  spec = PermutationSpec.for_model("resnet20", v)
  assert spec.sizes["stage1"] == 4 and spec.sizes["stage3"] == 16
  assert spec.sizes["layer2_1/conv1"] == 8
  assert len(spec.perms) == 3 + 9  # three streams, one inner perm per block
  assert spec.axes["layer2_0/shortcut_conv/kernel"] == (None, None, "stage1", "stage2")
  assert spec.axes["layer1_2/conv2/kernel"] == (None, None, "layer1_2/conv1", "stage1")
  assert spec.axes["batch_stats/layer3_0/shortcut_bn/var"] == ("stage3",)
  assert spec.axes["head/kernel"] == ("stage3", None)
  assert ("conv1/kernel", 3) in spec.perms["stage1"]
  _, v = abstract("vgg11_bn", (64, 64, 3))  # 64x64: the head sees 2x2x512
  assert models.permutation_spec("vgg11_bn", v)["head/kernel"] == (Flattened("conv8", outer=4), None)
  _, v = abstract("conv8", IMAGE)
  assert models.permutation_spec("conv8", v)["dense1/kernel"] == ("conv8", "dense1")


def test_params_alone_get_a_params_spec():
  _, v = abstract("vgg11_bn", IMAGE)
  axes = models.permutation_spec("vgg11_bn", v["params"])
  assert set(axes) == set(tree.names(v["params"]))


def test_spec_errors():
  _, v = abstract("logreg", IMAGE)
  with pytest.raises(ValueError, match="no permutation spec for model 'logreg'; models with one: "
                     "mlp, conv1d, cnn, resnet18, resnet20, conv8, vgg11"):
    models.permutation_spec("logreg", v)
  _, v = abstract("resnet20", IMAGE, width=4)
  with pytest.raises(ValueError, match="variables do not fit model 'mlp'"):
    models.permutation_spec("mlp", v)
  _, v = abstract("conv8", IMAGE, width=4)
  with pytest.raises(ValueError, match="variables do not fit model 'vgg11': head/kernel has 16 inputs, "
                     "not a multiple of the 32 units of conv8"):
    models.permutation_spec("vgg11", v)
  with pytest.raises(ValueError, match="no ResNet blocks"):
    models.permutation_spec("resnet20", v)
  with pytest.raises(ValueError, match="acts on two axes of w"):
    PermutationSpec({"w": ("p", "p")}, {"p": 3})
  with pytest.raises(ValueError, match="no size for"):
    PermutationSpec({"w": ("p", None)}, {})
  with pytest.raises(ValueError, match=r"w axis 0: size 6 is not 4 x n x 1"):
    PermutationSpec.from_tree({"w": (Flattened("p", outer=4), None)}, {"w": jnp.zeros((6, 2))})
  with pytest.raises(ValueError, match="p has 2 units here, 3 elsewhere"):
    PermutationSpec.from_tree({"u": ("p",), "w": ("p",)},
                              {"u": jnp.zeros(3), "w": jnp.zeros(2)})


# ---------------------------------------------------------------------------
# A permuted network computes the same function.

@pytest.mark.parametrize("name,options,shape", CASES,
                         ids=[f"{c[0]}{'-' + str(c[1]) if c[1] else ''}" for c in CASES])
def test_permuted_network_computes_the_same_function(name, options, shape):
  model = models.get_model(name, 10, **options)
  variables = nontrivial_variables(model, shape, 0)
  spec = PermutationSpec.for_model(name, variables)
  perms = random_perms(spec, jax.random.key(1))
  assert any(not np.array_equal(p, np.arange(p.shape[0])) for p in perms.values())
  permute = jax.jit(functools.partial(apply_permutation, spec))
  permuted = permute(perms, variables)
  jax.tree.map(np.testing.assert_array_equal, permuted,
               numpy_permutation(spec, perms, variables))
  apply = jax.jit(model.apply)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, *shape)), jnp.float32)
  want = apply(variables, x)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(apply(permuted, x), want, rtol=1e-5, atol=1e-5 * scale)
  # Not vacuous: permuting the weights but not all of them changes the function.
  broken = dict(permuted)
  if "batch_stats" in variables:
    broken["batch_stats"] = variables["batch_stats"]
  else:
    broken["params"] = {**permuted["params"], "head": variables["params"]["head"]}
  assert not np.allclose(apply(broken, x), want, rtol=1e-3, atol=1e-3 * scale)
  if name in ("resnet20", "vgg11_bn"):  # train mode: batch statistics, updated stats
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    got, new_p = train(permuted, x)
    want, new = train(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    expected = numpy_permutation(spec, perms, {"batch_stats": new["batch_stats"]})
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 new_p["batch_stats"], expected["batch_stats"])


def test_convention_unit_i_is_original_unit_perm_i():
  """P(w)[axis] = w.take(perm, axis): hidden unit i of the permuted MLP is
  unit perm[i] of the original (its sown activations show it). Eager (no jit)."""
  model = models.get_model("mlp", 3, widths=(7, 5))
  variables = nontrivial_variables(model, (6,), 3)
  spec = PermutationSpec.for_model("mlp", variables)
  perms = random_perms(spec, jax.random.key(4))
  permuted = apply_permutation(spec, perms, variables)
  k = variables["params"]["dense1"]["kernel"]
  np.testing.assert_array_equal(permuted["params"]["dense1"]["kernel"], k[:, perms["dense1"]])
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6)), jnp.float32)
  sow = jax.jit(functools.partial(model.apply, mutable=["activations"]))
  _, acts = sow(variables, x)
  _, acts_p = sow(permuted, x)
  for i, p in ((1, "dense1"), (2, "dense2")):
    np.testing.assert_allclose(acts_p["activations"][f"relu{i}"][0],
                               acts["activations"][f"relu{i}"][0][:, perms[p]], rtol=1e-6)


def test_flattened_axis_is_a_kronecker_permutation():
  """Brute force: the flattened head rows of conv1d, and a synthetic
  (outer, n, inner) axis, index by hand."""
  model = models.get_model("conv1d", 10, channels=6)
  v = nontrivial_variables(model, (40, 1), 6)
  spec = PermutationSpec.for_model("conv1d", v)
  perms = random_perms(spec, jax.random.key(7))
  head = np.asarray(v["params"]["head"]["kernel"])
  p = np.asarray(perms["conv3"])
  rows = [pos * 6 + p[c] for pos in range(5) for c in range(6)]
  got = jax.jit(functools.partial(apply_permutation, spec))(perms, v)
  np.testing.assert_array_equal(got["params"]["head"]["kernel"], head[rows])

  outer, n, inner = 2, 4, 3
  w = np.arange(5 * outer * n * inner, dtype=np.float32).reshape(5, outer * n * inner)
  spec = PermutationSpec.from_tree({"w": (None, Flattened("q", outer, inner))}, {"w": w})
  q = np.array([2, 0, 3, 1])
  cols = [o * n * inner + q[i] * inner + r
          for o, i, r in itertools.product(range(outer), range(n), range(inner))]
  np.testing.assert_array_equal(apply_permutation(spec, {"q": jnp.asarray(q)}, {"w": w})["w"],
                                w[:, cols])


def test_invert_compose_identity():
  model = models.get_model("resnet20", 10, width=4)
  variables = nontrivial_variables(model, IMAGE, 8)
  spec = PermutationSpec.for_model("resnet20", variables)
  permute = jax.jit(functools.partial(apply_permutation, spec))
  p = random_perms(spec, jax.random.key(9))
  q = random_perms(spec, jax.random.key(10))
  once = permute(p, variables)
  jax.tree.map(np.testing.assert_array_equal, permute(invert(p), once), variables)
  jax.tree.map(np.testing.assert_array_equal, compose(p, invert(p)), identity_perms(spec))
  jax.tree.map(np.testing.assert_array_equal, permute(compose(p, q), variables), permute(q, once))
  jax.tree.map(np.testing.assert_array_equal, permute(identity_perms(spec), variables), variables)
  # Same key, same permutations; another key, others.
  jax.tree.map(np.testing.assert_array_equal, p, random_perms(spec, jax.random.key(9)))
  assert not all(np.array_equal(p[k], q[k]) for k in p)
  with pytest.raises(ValueError, match="compose needs the same permutations"):
    compose(p, {"stage1": q["stage1"]})


def test_static_spec():
  """A spec built twice is equal and hashes alike (a static jit argument);
  it can be built from shapes alone."""
  _, shapes = abstract("vgg11_bn", IMAGE)
  spec = PermutationSpec.for_model("vgg11_bn", shapes)
  assert spec == PermutationSpec.for_model("vgg11_bn", shapes)
  assert hash(spec) == hash(PermutationSpec.for_model("vgg11_bn", shapes))
  assert spec != PermutationSpec.for_model("vgg11", shapes["params"])
  w = {"w": jnp.arange(12.0).reshape(4, 3)}
  small = PermutationSpec.from_tree({"w": ("p", None)}, w)
  perms = {"p": jnp.array([3, 1, 0, 2])}
  static = jax.jit(apply_permutation, static_argnums=0)(small, perms, w)
  np.testing.assert_array_equal(static["w"], np.asarray(w["w"])[[3, 1, 0, 2]])
  # vmapped over permutations and trees (e.g. seeds side by side).
  many = {"p": jnp.array([[3, 1, 0, 2], [0, 1, 2, 3], [1, 0, 3, 2]])}
  trees = {"w": jnp.stack([w["w"], 2 * w["w"], -w["w"]])}
  out = jax.vmap(functools.partial(apply_permutation, small))(many, trees)
  for i in range(3):
    np.testing.assert_array_equal(out["w"][i], np.asarray(trees["w"][i])[np.asarray(many["p"][i])])


def test_apply_errors():
  v = nontrivial_variables(models.get_model("mlp", 10, widths=(4,)), (5,), 0)
  spec = PermutationSpec.for_model("mlp", v)
  with pytest.raises(ValueError, match=r"missing \['dense1'\], unknown \['dense9'\]"):
    apply_permutation(spec, {"dense9": jnp.arange(4)}, v)
  with pytest.raises(ValueError, match=r"perm 'dense1' has shape \(3,\), the spec needs \(4,\)"):
    apply_permutation(spec, {"dense1": jnp.arange(3)}, v)
  with pytest.raises(ValueError, match="extra/w: not in the spec"):
    apply_permutation(spec, identity_perms(spec), {**v, "extra": {"w": jnp.zeros(2)}})


# ---------------------------------------------------------------------------
# Conv8 (Chijiwa 2024; learning-transfer models/networks/convs.py).

def conv8_params(width, classes, last_pool):
  """By hand: eight conv3x3 with bias, dense 4w, 4w, head."""
  chans = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width, 8 * width]
  n = sum(9 * cin * cout + cout for cin, cout in zip(chans[:-1], chans[1:]))
  positions = (2 * 2) if last_pool == 2 else 1  # 32 -> 16 -> 8 -> 4 -> 4/last_pool
  flat = positions * 8 * width
  return n + (flat * 4 * width + 4 * width) + (16 * width * width + 4 * width) + (
      4 * width * classes + classes)


def test_conv8_parameter_count_and_structure():
  _, v = abstract("conv8", IMAGE)
  assert models.count_params(v["params"]) == conv8_params(64, 10, 4) == 4_885_066
  _, v = abstract("conv8", IMAGE, last_pool=2)
  assert models.count_params(v["params"]) == conv8_params(64, 10, 2) == 5_278_282
  assert v["params"]["dense1"]["kernel"].shape == (2048, 256)
  model, v = abstract("conv8", IMAGE, width=4)
  assert set(v) == {"params"}  # no BatchNorm
  assert [v["params"][f"conv{i}"]["kernel"].shape[-1] for i in range(1, 9)] == [
      4, 4, 8, 8, 16, 16, 32, 32]
  assert v["params"]["head"]["kernel"].shape == (16, 10)
  assert models.model_options("conv8") == ("width", "last_pool", "dtype", "init")
  assert models.get_model("conv8", 10).init_scheme == "torch"
  out, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["activations"]),
                              v, jnp.zeros((2, *IMAGE)))
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  assert len(jax.tree.leaves(state["activations"])) == 10


def test_conv8_matches_pytorch_reference():
  """The same weights in learning-transfer's Conv8 layout (convs, then the
  dense layers as 1x1 convs, a 4x4 last max-pool) give the same logits."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  torch.manual_seed(0)
  w = 4
  chans = [3, w, w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w]
  layers = []
  for i in range(8):
    layers += [tnn.Conv2d(chans[i], chans[i + 1], 3, padding=1), tnn.ReLU()]
    if i in (1, 3, 5):
      layers.append(tnn.MaxPool2d((2, 2)))
  layers.append(tnn.MaxPool2d((4, 4)))
  convs = tnn.Sequential(*layers)
  linear = tnn.Sequential(tnn.Conv2d(8 * w, 4 * w, 1), tnn.ReLU(), tnn.Conv2d(4 * w, 4 * w, 1),
                          tnn.ReLU(), tnn.Conv2d(4 * w, 10, 1))
  tconvs = [m for m in convs if isinstance(m, tnn.Conv2d)]
  names = [f"conv{i}" for i in range(1, 9)] + ["dense1", "dense2", "head"]
  params = {}
  for name, m in zip(names, tconvs + [m for m in linear if isinstance(m, tnn.Conv2d)]):
    k = torch.movedim(m.weight.detach(), (0, 1), (-1, -2)).numpy()  # (h, w, in, out)
    params[name] = {"kernel": k if name.startswith("conv") else k[0, 0],
                    "bias": m.bias.detach().numpy()}
  x = np.random.default_rng(0).normal(size=(2, *IMAGE)).astype(np.float32)
  with torch.no_grad():
    out = convs(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
    want = linear(out.view(2, 8 * w, 1, 1)).squeeze().numpy()
  got = models.get_model("conv8", 10, width=w).apply({"params": params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.abs(want).max() > 1e-3  # not a degenerate all-zero comparison
