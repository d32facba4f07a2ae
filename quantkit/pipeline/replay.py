"""Passes over the calibration batches that skip work whose result is already known.

True-sequential GPTQ runs one layer over the calibration set once per group of linears (to
collect that group's Hessian with the earlier groups quantized) and once more for the next
layer's inputs. Two things make those passes cheap without touching the model's code:

- **Early stop.** A Hessian pass only needs the layer to run as far as the linears it observes;
  a forward hook raises once they have all seen their input, so nothing after them runs.
- **Replay.** Once the groups before a sub-module are finished, that sub-module's input no longer
  changes, and once its own linears are finished its weights do not either: its output is final.
  It is recorded the next time it runs and replayed (its ``forward`` swapped for a lookup) in
  later passes. Groups are listed in call order, so "every group it uses is among the finished
  prefix of groups" is exactly that condition. Recordings are kept within a byte budget; whatever
  does not fit is recomputed, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class StopLayer(Exception):
    """Raised inside a layer's forward pass once everything a pass observes has run."""


class ReplayCache:
    """Recorded outputs of a layer's finished sub-modules, one per calibration batch."""

    def __init__(self, layer: nn.Module, group_linears: Sequence[Sequence[str]], budget_bytes: int) -> None:
        self.layer = layer
        self.group_linears = [tuple(names) for names in group_linears]
        self.budget_bytes = budget_bytes
        self.finished_groups = 0  # length of the finished prefix of groups (in call order)
        self._outputs: dict[str, list] = {}  # sub-module name -> complete recording
        self.batch_index = 0

    @property
    def cached_bytes(self) -> int:
        return sum(_nbytes(output) for outputs in self._outputs.values() for output in outputs)

    def final_modules(self) -> list[str]:
        """The largest sub-modules whose outputs are final: every linear they contain belongs to
        a finished group, and they contain at least one."""
        finished = {name for names in self.group_linears[: self.finished_groups] for name in names}
        pending = {name for names in self.group_linears[self.finished_groups:] for name in names}
        final = []
        for name, _module in self.layer.named_modules():
            if not name or any(name.startswith(parent + ".") for parent in final):
                continue
            inside = {linear for linear in finished | pending if linear == name or linear.startswith(name + ".")}
            if inside and inside <= finished:
                final.append(name)
        return final

    def run(self, batches: Sequence, run_one: Callable[[object], object], *, stop_before: Sequence[nn.Module] = (),
            record: bool = True) -> list:
        """``run_one(batch)`` for every batch, replaying every recorded sub-module, recording the
        largest final ones not yet recorded (with ``record``, while the budget allows), and
        stopping each batch as soon as every module of ``stop_before`` has been reached (its
        forward pre-hooks have run, its forward has not). Returns the results (``None`` for a
        stopped batch)."""
        final = self.final_modules()
        replaying = list(self._outputs)
        recording = {name: [] for name in final if record and name not in self._outputs}
        handles = [self.layer.get_submodule(name).register_forward_hook(_recorder(recording, name))
                   for name in recording]
        stopper = _Stopper(stop_before)
        handles += stopper.handles
        for name in replaying:
            self.layer.get_submodule(name).forward = _replayer(self, name)
        results = []
        try:
            for index, batch in enumerate(batches):
                self.batch_index = index
                stopper.reset()
                try:
                    results.append(run_one(batch))
                except StopLayer:
                    results.append(None)
                self._trim(recording, len(batches))
        finally:
            for handle in handles:
                handle.remove()
            for name in replaying:
                del self.layer.get_submodule(name).forward
        self._keep(recording, len(batches), final)
        return results

    def _trim(self, recording: dict[str, list], total: int) -> None:
        # After a batch, drop recordings whose projected size would break the budget.
        spent = self.cached_bytes
        for name in sorted(recording, key=lambda n: n.count(".")):
            parts = recording[name]
            if not parts:
                continue
            projected = _nbytes(parts[0]) * total
            if spent + projected > self.budget_bytes:
                del recording[name]
            else:
                spent += projected

    def _keep(self, recording: dict[str, list], total: int, final: list[str]) -> None:
        for name, parts in recording.items():
            if len(parts) == total:
                self._outputs[name] = parts
        # a finished parent's recording makes its children's redundant
        for name in list(self._outputs):
            if name not in final and any(name.startswith(parent + ".") for parent in final if parent in self._outputs):
                del self._outputs[name]


def _recorder(recording: dict[str, list], name: str):
    def hook(_module, _inputs, output):
        if name in recording and _storable(output):
            recording[name].append(_detach(output))
        else:
            recording.pop(name, None)

    return hook


def _replayer(cache: ReplayCache, name: str):
    def forward(*_args, **_kwargs):
        return cache._outputs[name][cache.batch_index]

    return forward


class _Stopper:
    """Forward pre-hooks that raise ``StopLayer`` once every watched module has been reached in
    this batch. Registered after the observers' pre-hooks, so those still see the input."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.waiting: set[int] = set()
        self.handles = [module.register_forward_pre_hook(self._hook) for module in self.modules]

    def reset(self) -> None:
        self.waiting = {id(module) for module in self.modules}

    def _hook(self, module, _inputs) -> None:
        self.waiting.discard(id(module))
        if not self.waiting:
            raise StopLayer


def _storable(output) -> bool:
    if isinstance(output, torch.Tensor):
        return True
    if isinstance(output, (tuple, list)):
        return all(item is None or isinstance(item, torch.Tensor) for item in output)
    return False


def _detach(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    return type(output)(item.detach() if isinstance(item, torch.Tensor) else item for item in output)


def _nbytes(output) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    return sum(_nbytes(item) for item in output if isinstance(item, torch.Tensor))
