"""`train_run`: `train` inside a stored run: found, resumed, or trained once.

    states, result = train_run(store.run(spec, label), start_states=lambda: ...,
                               template=..., program=..., data=..., until=...,
                               data_seeds=seeds)

* a finished run (`DONE`) is loaded: its `final` snapshot and `result.json`;
* otherwise, under the run's lock (a second process waits, then finds it
  finished), it continues from its latest checkpoint, or starts: the start
  state is built (`start_states()`, called only then), saved as snapshot
  `init`, and trained with a checkpoint hook (every `checkpoint_every` steps
  and on SIGTERM) plus the caller's hooks;
* at the end the `final` snapshot and the result (the loop position: per-
  replica counters and the hooks' records, plus `extra_result(states)`) are
  saved and the run is marked done.

`inputs` may be a callable, called once the start is in place (its `init`
snapshot saved), e.g. to read a penalty's reference from a stored snapshot.

Named snapshots at given steps: pass `snapshot_steps`; they land in
`snapshots/step_<k>` of the run, and any of them is a warm-start source, a
rewind point or a curve endpoint of another run.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from wsjax.core import hooks as hooks_lib
from wsjax.core.data import TrainData
from wsjax.core.loop import Hook, Until, train
from wsjax.core.program import Program
from wsjax.core.store import Run


def train_run(run: Run, *, start_states: Callable[[], Any], template: Any, program: Program,
              data: TrainData, until: Until, data_seeds: Sequence[int], start: int = 0,
              inputs: Any = None, hooks: Sequence[Hook] = (), checkpoint_every: int = 0,
              snapshot_steps: Sequence[int] = (), on_divergence: str = "raise",
              label: str = "", log: Callable[[str], None] = print,
              extra_result: Optional[Callable[[Any], dict]] = None,
              on_load: Optional[Callable[[], None]] = None) -> tuple[Any, dict]:
  """Loads, resumes or trains `run` (see the module docstring); returns the
  final states (replicated) and the run's result dict (with `"run"`: its
  directory name and `"reused"`: whether it was already finished)."""
  if run.done:
    if on_load is not None:
      on_load()
    return run.load_snapshot("final", template), {**run.result(), "reused": True}
  with run.lock():
    if run.done:  # another process finished it while we waited
      return run.load_snapshot("final", template), {**run.result(), "reused": True}
    position = None
    if run.latest_checkpoint() is not None:
      states, _, position = run.restore_checkpoint(template)
      log(f"{label}resuming {run.dir} at step {position['step']}")
    else:
      states = start_states()
      run.save_snapshot("init", states)
    if callable(inputs):  # e.g. a penalty's reference read from a stored snapshot
      inputs = inputs()
    checkpoint = hooks_lib.Checkpoint(
        lambda loop: run.save_checkpoint(loop.states, loop.position), checkpoint_every,
        where=run.dir)
    # the checkpoint hook runs last at a boundary, so what the other hooks
    # record there (an evaluation, a snapshot) is in the checkpoint: a resumed
    # run's records equal the uninterrupted run's
    all_hooks = [*hooks]
    if snapshot_steps:
      all_hooks.append(hooks_lib.SaveSnapshots(snapshot_steps, run.save_snapshot))
    all_hooks.append(checkpoint)
    states, position = train(states, program, data, until, data_seeds=data_seeds, start=start,
                             inputs=inputs, hooks=all_hooks, position=position,
                             on_divergence=on_divergence, label=label)
    result = dict(position)
    if extra_result is not None:
      result.update(extra_result(states))
    result["run"] = f"run_{run.hash}"
    run.finish(states, result)
  return states, {**result, "reused": False}
