"""Count the places where a training step reads a device tensor back to the host.

On a GPU each such read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.numpy()``,
``.cpu()``, a data-dependent shape as in ``nonzero``/``masked_select``/boolean indexing) waits
for every queued kernel to finish, so the host can no longer run ahead of the device. On a CPU
nothing waits, but the same calls happen in the same places, so counting them here keeps a GPU
step sync-free without a GPU.

:class:`HostSyncCounter` is a ``TorchDispatchMode`` (it sees every aten op, inside autograd's
backward too, and the scalar reads that ``item``/``bool``/``float`` make through
``aten._local_scalar_dense``) plus wrappers of the Python-level ``Tensor.tolist``/``numpy``/``cpu``,
which do not dispatch on CPU tensors. Each event keeps the innermost frame outside torch that
caused it, so a failing test names the line.

Not counted: reads inside ``torch/optim`` (the non-fused optimizers read their step counter, a
tensor that lives on the host even when the weights are on a GPU).
"""
from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result's size or value the host must know before it can go on.
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_TORCH_DIR = os.path.dirname(torch.__file__)
_HOST_SIDE_TORCH = (os.path.join(_TORCH_DIR, "optim"),)


def _caller() -> str:
    """The innermost stack frame outside torch (file:line function)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_TORCH_DIR) and not frame.filename == __file__:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


# torch's own wrappers between a Python call and the op it makes (``torch.compiler.disable`` etc.).
_PLUMBING = tuple(os.path.join(_TORCH_DIR, p) for p in ("_dynamo", "_compile.py", "_ops.py", "utils/_python_dispatch.py"))


def _inside_host_side_torch() -> bool:
    """Whether the Python code that made the op is in torch/optim (past this file and torch's wrappers)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename == __file__ or frame.filename.startswith(_PLUMBING):
            continue
        return frame.filename.startswith(_HOST_SIDE_TORCH)
    return False


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


@dataclass
class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as counter: ...`` then ``counter.events`` (what, where)."""

    events: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self._patched = []

    def _record(self, what: str) -> None:
        if not _inside_host_side_torch():
            self.events.append(f"{what} at {_caller()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS or (func in _INDEX_OPS and _has_bool_index(args)):
            self._record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def wrapped(tensor, *a, _original=original, _name=name, **k):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, wrapped)
            self._patched.append((name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def syncs_per_step(run: Callable[[int], object], steps: Tuple[int, int] = (2, 4)) -> Dict[str, float]:
    """The host syncs that every training step adds, by place.

    ``run(n)`` trains ``n`` steps from scratch (a whole trainer ``main``: set-up, the loop, the
    final logging, checkpoint and export). Whatever happens once per run is the same for both step
    counts; what grows with ``n`` is the step's own. Keep both runs inside one epoch and let the
    loop log, validate and checkpoint only at the end, so that those happen once in each run.
    """
    counts = []
    for n in steps:
        with HostSyncCounter() as counter:
            run(n)
        counts.append(Counter(counter.events))
    extra = steps[1] - steps[0]
    return {where: (counts[1][where] - counts[0][where]) / extra
            for where in set(counts[0]) | set(counts[1]) if counts[1][where] != counts[0][where]}
