"""The lottery protocol in PyTorch, written the way open_lth runs it.

open_lth (facebookresearch/open_lth) trains one (level, replicate) at a
time: `training/train.py` `standard_train` builds the model, loads the
rewound state, wraps it in `pruning/pruned_model.PrunedModel` (whose
`forward` first multiplies every prunable weight by its mask,
`_apply_mask`), and runs eager steps with an SGD optimizer and a
per-iteration `LambdaLR` schedule (`training/optimizers.py`), reading the
loss back every step for its metric callbacks. `train_pruned` is that loop
for one run from a start step k to the end step T: the network's own
weights and mask, the same batches wsjax trains on (index arrays), SGD
with momentum and coupled weight decay, the learning rate x factor at each
boundary step, and the final test accuracy.

torch is optional (`pip install wsjax[bench]`); see
`benchmarks.torch_reference.require_torch`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from benchmarks import torch_reference as ref


def kaiming_normal_(model) -> None:
  """open_lth's `models/initializers.kaiming_normal`: N(0, 2 / fan_in) for
  every Conv/Linear weight (biases keep PyTorch's default)."""
  torch = ref.require_torch()
  for m in model.modules():
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
      torch.nn.init.kaiming_normal_(m.weight)


def prunable_names(model) -> list[str]:
  """open_lth's `prunable_layer_names` minus the classifier (`fc.weight` is
  ignored by its LeNet and VGG pruning hparams): every Conv/Linear weight but
  the head's."""
  torch = ref.require_torch()
  return [f"{name}.weight" for name, m in model.named_modules()
          if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))
          and name != "head"]


def random_masks(model, density: float, seed: int) -> dict:
  """A mask per prunable weight keeping `density` of its entries."""
  torch = ref.require_torch()
  g = torch.Generator().manual_seed(seed)
  params = dict(model.named_parameters())
  return {n: (torch.rand(params[n].shape, generator=g) < density).float()
          for n in prunable_names(model)}


def train_pruned(model, masks: dict, x_train, y_train, x_test, y_test,
                 orders: Sequence[np.ndarray], start: int, end: int, *, lr: float,
                 momentum: float, weight_decay: float, boundaries: Sequence[int],
                 factor: float = 0.1) -> dict:
  """Trains `model` from global step `start` to `end` under `masks`.

  `orders[e]` is epoch e's (steps_per_epoch, batch) index array; step t
  uses row t % E of epoch t // E (open_lth skips the batches before the
  start step the same way). Returns the steps taken and the test accuracy.
  """
  torch = ref.require_torch()
  params = dict(model.named_parameters())
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                              weight_decay=weight_decay)
  criterion = torch.nn.CrossEntropyLoss()
  per_epoch = len(orders[0])
  model.train()
  for t in range(start, end):
    rate = lr * factor ** sum(t >= b for b in boundaries)
    for group in optimizer.param_groups:
      group["lr"] = rate
    idx = torch.from_numpy(np.asarray(orders[t // per_epoch][t % per_epoch], np.int64))
    with torch.no_grad():  # PrunedModel.forward: _apply_mask
      for name, m in masks.items():
        params[name].mul_(m)
    optimizer.zero_grad()
    outputs = model(x_train[idx])
    loss = criterion(outputs, y_train[idx])
    loss.backward()
    optimizer.step()
    loss.item()  # the metric callbacks read every step's loss
  with torch.no_grad():
    for name, m in masks.items():
      params[name].mul_(m)
    model.eval()
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
  return {"steps": end - start, "test_acc": acc}
