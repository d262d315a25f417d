"""PyTorch reference implementations, written the way the official code is.

The networks (the layer structure of kuangliu/pytorch-cifar,
JordanAsh/warm_start and the MNIST-1D ConvNet, modules named like wsjax's
parameters, PyTorch's default initialization) are also what
`tests/test_models.py` checks wsjax's models against. The loops follow
the official DASH code (baekrok/DASH-Direction-Aware-SHrinking, `main.py`
and `utils/train_utils.py`): eager `model.train()` steps over a
`DataLoader(ConcatDataset(buffer), batch_size=128, shuffle=True)`, one seed
at a time, `.item()` on the loss and accuracy of every step, DASH's gradient
EMA over chunk-sized batches and its cosine shrink per kernel slice / unit /
bias.

torch is an optional extra (`pip install wsjax[bench]`): this module imports
without it, and every function that needs it calls `require_torch()`, which
raises `TorchMissing` saying how to install it.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np

try:
  import torch
  from torch import nn
  import torch.nn.functional as F
  from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset
except ImportError:  # pragma: no cover - reported by require_torch
  torch = None


class TorchMissing(RuntimeError):
  """torch is not installed; the reference side of a benchmark cannot run."""


def require_torch():
  """Returns the torch module or raises TorchMissing with the fix."""
  if torch is None:
    raise TorchMissing("PyTorch is not installed: the reference side is skipped "
                       "(install it with `pip install wsjax[bench]`)")
  return torch


def set_threads(n: int) -> int:
  """Pins torch's intra-op threads to `n` (the cores XLA uses); returns it."""
  require_torch()
  torch.set_num_threads(n)
  return torch.get_num_threads()


# ---------------------------------------------------------------------------
# Networks (PyTorch default init; tests/test_models.py compares wsjax's to them).

if torch is not None:

  class MLP(nn.Module):
    """Flatten -> Linear(in, 100) -> ReLU -> Linear(100, 100) -> ReLU -> Linear."""

    def __init__(self, in_features: int, classes: int, widths=(100, 100)):
      super().__init__()
      self.dense1 = nn.Linear(in_features, widths[0])
      self.dense2 = nn.Linear(widths[0], widths[1])
      self.head = nn.Linear(widths[1], classes)

    def forward(self, x):
      x = x.reshape(x.size(0), -1)
      return self.head(F.relu(self.dense2(F.relu(self.dense1(x)))))

  class Conv1D(nn.Module):
    """The MNIST-1D ConvNet: three Conv1d(32) + ReLU (40 -> 20 -> 10 -> 5), Linear."""

    def __init__(self, channels: int = 32, classes: int = 10):
      super().__init__()
      self.conv1 = nn.Conv1d(1, channels, 5, 2, 2)
      self.conv2 = nn.Conv1d(channels, channels, 3, 2, 1)
      self.conv3 = nn.Conv1d(channels, channels, 3, 2, 1)
      self.head = nn.Linear(5 * channels, classes)

    def forward(self, x):
      for conv in (self.conv1, self.conv2, self.conv3):
        x = F.relu(conv(x))
      return self.head(x.view(x.size(0), -1))

  class Block(nn.Module):
    """kuangliu's BasicBlock."""

    def __init__(self, cin, c, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(c)
      self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(c)
      self.project = stride != 1 or cin != c
      if self.project:
        self.shortcut_conv = nn.Conv2d(cin, c, 1, stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      short = self.shortcut_bn(self.shortcut_conv(x)) if self.project else x
      return F.relu(out + short)

  class ResNet(nn.Module):
    """kuangliu's CIFAR ResNet (ResNet-18: stages (2, 2, 2, 2), width 64)."""

    def __init__(self, stages=(2, 2, 2, 2), width=64, classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.blocks, cin = [], width
      for s, n in enumerate(stages):
        for b in range(n):
          name = f"layer{s + 1}_{b}"
          setattr(self, name, Block(cin, width * 2**s, 2 if s and not b else 1))
          self.blocks.append(name)
          cin = width * 2**s
      self.head = nn.Linear(cin, classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      for name in self.blocks:
        out = getattr(self, name)(out)
      out = F.avg_pool2d(out, out.size(3))
      return self.head(out.view(out.size(0), -1))


  class VGG(nn.Module):
    """kuangliu's CIFAR VGG: `cfg` convs (3x3, padding 1, "M" = 2x2 max-pool),
    BatchNorm after each conv if `bn`, Linear(512, classes)."""

    def __init__(self, cfg, bn, classes=10):
      super().__init__()
      self.cfg, self.bn, cin, i = cfg, bn, 3, 0
      for c in cfg:
        if c != "M":
          i += 1
          setattr(self, f"conv{i}", nn.Conv2d(cin, c, 3, padding=1))
          if bn:
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
          cin = c
      self.head = nn.Linear(512, classes)

    def forward(self, x):
      i = 0
      for c in self.cfg:
        if c == "M":
          x = F.max_pool2d(x, 2, 2)
          continue
        i += 1
        x = getattr(self, f"conv{i}")(x)
        if self.bn:
          x = getattr(self, f"bn{i}")(x)
        x = F.relu(x)
      return self.head(x.view(x.size(0), -1))


def make_model(name: str, classes: int = 10):
  """The reference network for a wsjax model name (MNIST-1D inputs for mlp)."""
  require_torch()
  if name == "mlp":
    return MLP(40, classes)
  if name == "conv1d":
    return Conv1D(32, classes)
  if name == "resnet18":
    return ResNet((2, 2, 2, 2), 64, classes)
  raise ValueError(f"no PyTorch reference for model {name!r}")


def to_torch_inputs(name: str, x: np.ndarray):
  """wsjax's channels-last inputs -> the reference's layout (NCW / NCHW)."""
  require_torch()
  if name == "mlp":
    return torch.from_numpy(np.array(x.reshape(len(x), -1), np.float32))
  return torch.from_numpy(np.array(np.moveaxis(x, -1, 1), np.float32, order="C"))


def sgd(model, lr: float, momentum: float):
  return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


# ---------------------------------------------------------------------------
# Training loops.

def train_step(model, optimizer, criterion, inputs, targets):
  """One step of the official `train_epoch`; returns (batch acc, loss) floats."""
  optimizer.zero_grad()
  outputs = model(inputs)
  loss = criterion(outputs, targets)
  loss.backward()
  optimizer.step()
  return (outputs.argmax(1) == targets).float().mean().item(), loss.item()


def train_epoch(model, optimizer, criterion, loader):
  """The official `train_epoch`: mean of per-batch accuracies and losses."""
  model.train()
  total_acc, total_loss, steps = 0.0, 0.0, 0
  for inputs, targets in loader:
    acc, loss = train_step(model, optimizer, criterion, inputs, targets)
    total_acc += acc
    total_loss += loss
    steps += 1
  return total_acc / steps, total_loss / steps, steps


def index_batches(x, y, order):
  """Batches by indexing whole tensors with rows of `order` (steps, batch)."""
  for row in torch.from_numpy(np.asarray(order, np.int64)):
    yield x[row], y[row]


def evaluate(model, loader) -> float:
  model.eval()
  correct, total = 0, 0
  with torch.no_grad():
    for inputs, targets in loader:
      correct += (model(inputs).argmax(1) == targets).sum().item()
      total += len(targets)
  return correct / total


# ---------------------------------------------------------------------------
# DASH (official utils/train_utils.py: `dash`, `perform_dash`).

def _is_layer(m) -> bool:
  return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))


def dash(model, criterion, chunk_loader, lam: float = 0.3, alpha: float = 0.3):
  """Shrinks `model` in place by the cosine with the chunk-gradient EMA.

  As the official `dash`: the EMA of NEGATIVE gradients over the buffer's
  chunk-sized batches (arrival order) on a copy of the model, then per
  conv kernel slice (`o i k -> o i` cosines over taps), per Linear output
  unit, and one cosine per bias vector: `W *= clamp(cos, lam, 1)`. The
  official code lists `nn.Conv2d`; the MNIST-1D ConvNet's `nn.Conv1d` is
  treated the same way (one cosine per (out, in) slice).
  """
  temp_net = copy.deepcopy(model)
  grads, bias_grads = [], []
  for m in temp_net.modules():
    if _is_layer(m):
      grads.append(torch.zeros_like(m.weight))
      if m.bias is not None:
        bias_grads.append(torch.zeros_like(m.bias))
  for x_batch, y_batch in chunk_loader:
    temp_net.zero_grad()
    loss = criterion(temp_net(x_batch), y_batch)
    loss.backward()
    step = bias_step = 0
    for m in temp_net.modules():
      if _is_layer(m):
        grads[step] = (1 - alpha) * grads[step] + alpha * (-m.weight.grad.detach())
        if m.bias is not None:
          bias_grads[bias_step] = (1 - alpha) * bias_grads[bias_step] + alpha * (-m.bias.grad.detach())
          bias_step += 1
        step += 1
  step = bias_step = 0
  with torch.no_grad():
    for m in model.modules():
      if not _is_layer(m):
        continue
      if isinstance(m, nn.Linear):
        cos = torch.cosine_similarity(grads[step], m.weight, dim=-1)
        m.weight.mul_(torch.clamp(cos, min=lam, max=1)[:, None])
      else:
        o, i = m.weight.shape[:2]
        grad = grads[step].reshape(o, i, -1)
        param = m.weight.view(o, i, -1)
        cos = torch.cosine_similarity(grad, param, dim=-1)
        param.mul_(torch.clamp(cos, min=lam, max=1)[:, :, None])
      step += 1
      if m.bias is not None:
        cos = torch.cosine_similarity(bias_grads[bias_step].reshape(1, -1), m.bias.reshape(1, -1))
        m.bias.mul_(torch.clamp(cos, min=lam, max=1))
        bias_step += 1
  return model


# ---------------------------------------------------------------------------
# The chunked study (official main.py `run`, one seed).

def run_chunked_study(model_name: str, x_train, y_train, x_test, y_test,
                      chunk_indices, method: str, seed: int, *, lr: float,
                      momentum: float, batch_size: int, threshold: Optional[float],
                      max_epochs: int, dash_lambda: float = 0.3,
                      dash_alpha: float = 0.3) -> dict:
  """Trains one seed of one method through the chunks, as the official `run`.

  `x_*` are the reference's tensors (layout of `to_torch_inputs`), `y_*`
  int64 tensors, `chunk_indices` the list of per-chunk index arrays (the
  same chunks wsjax uses). A stage trains until the epoch-mean of per-batch
  accuracies reaches `threshold` or `max_epochs` epochs. Methods: `cold`
  (new model and optimizer after every chunk), `warm` (keep both), `dash`
  (keep both; DASH shrink before every chunk after the first). Returns the
  per-stage steps, epochs and test accuracies.
  """
  require_torch()
  torch.manual_seed(seed)
  np.random.seed(seed)
  train_set = TensorDataset(x_train, y_train)
  chunks = [Subset(train_set, [int(i) for i in idx]) for idx in chunk_indices]
  chunk_size = len(chunks[0])
  test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
  model = make_model(model_name)
  criterion = nn.CrossEntropyLoss()
  optimizer = sgd(model, lr, momentum)
  buffer, stages = [], []
  for chunk_idx, chunk in enumerate(chunks):
    buffer.append(chunk)
    loader = DataLoader(ConcatDataset(buffer), batch_size=batch_size, shuffle=True)
    if method == "dash" and chunk_idx >= 1:
      model.eval()
      dash_loader = DataLoader(ConcatDataset(buffer), batch_size=chunk_size, shuffle=False)
      model = dash(model, criterion, dash_loader, dash_lambda, dash_alpha)
    epoch = steps = 0
    while True:
      acc, _, n = train_epoch(model, optimizer, criterion, loader)
      epoch += 1
      steps += n
      if (threshold is not None and acc >= threshold) or epoch >= max_epochs:
        break
    stages.append({"steps": steps, "epochs": epoch, "train_acc": acc,
                   "test_acc": evaluate(model, test_loader)})
    if method == "cold":
      model = make_model(model_name)
      optimizer = sgd(model, lr, momentum)
    elif method not in ("warm", "dash"):
      raise ValueError(f"the reference study has no method {method!r}")
  return {"stages": stages}

