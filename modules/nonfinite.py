"""Non-finite losses and gradients: skip the update, count it, stop after too many in a row.

A NaN or inf in a loss or a gradient (a bad batch, a too-high learning rate, an overflow) would
otherwise be written into the weights by the next optimizer step, and then into every checkpoint
after it. :class:`NonFiniteGuard` keeps them out, without reading anything on the host in the step
(a host sync would stall a GPU's queue every step):

- each optimizer step's verdict is a device tensor: the loss of every micro-batch of the step and
  the gradient norm (the clipping norm, or the total norm when nothing is clipped) are finite;
- the step is skipped on the device: torch's fused Adam/AdamW take a ``found_inf`` tensor (the
  same mechanism fp16 loss scaling uses) and then leave weights, moments and step count alone.
  An optimizer without it falls back to one host read of the verdict per step;
- the EMA folds in nothing on a skipped step (a lerp weighted by the verdict); the LR schedule and
  the step counter advance (they live on the host);
- counts stay on the device: the total, the current streak, and the first step at which the streak
  reached ``max_consecutive``. The loop reads them where it reads the logs anyway (logging steps)
  and before every checkpoint, and stops the run with a message naming that step.

Under fp16 loss scaling, overflowing gradients are the scaler's business (it skips them and
lowers its scale, which is normal at the start); only a non-finite *loss* counts here then.
With several processes the gradients are all-reduced, so every rank reaches the same verdict on
them; the counts are combined (max over ranks) when read, so every rank stops together.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["NonFiniteGuard", "all_finite", "total_grad_norm"]


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients of ``parameters`` together (a 0-dim device tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def all_finite(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether every parameter and floating buffer of ``modules`` is finite (one host read)."""
    flags = [torch.isfinite(t).all() for m in modules for t in (*m.parameters(), *m.buffers())
             if t.is_floating_point() and t.numel()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class NonFiniteGuard:
    """See the module docstring. ``max_consecutive``: stop after this many skipped steps in a row.

    ``loss_scaling``: fp16 with a GradScaler (gradients are then not judged here, see above).
    """

    def __init__(self, device: torch.device, max_consecutive: int, loss_scaling: bool = False) -> None:
        self.device = torch.device(device)
        self.max_consecutive = max_consecutive
        self.loss_scaling = loss_scaling
        # total skipped, current streak, first step at which the streak reached the limit (-1: none)
        self.counts = torch.tensor([0, 0, -1], dtype=torch.long, device=self.device)
        self._step_ok = torch.ones((), dtype=torch.bool, device=self.device)

    # -- during an optimizer step -------------------------------------------------------------
    def note_loss(self, loss: torch.Tensor) -> None:
        """Every micro-batch's loss counts toward its optimizer step's verdict."""
        self._step_ok = self._step_ok & torch.isfinite(loss.detach()).all().to(self.device)

    def verdict(self, grad_norm: Optional[torch.Tensor], parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """Whether this optimizer's update may be applied (the step's losses and, without loss
        scaling, its gradient norm finite; ``grad_norm`` None: computed from ``parameters``)."""
        if self.loss_scaling:
            return self._step_ok
        if grad_norm is None:
            grad_norm = total_grad_norm(parameters)
        return self._step_ok & torch.isfinite(grad_norm).to(self.device)

    @contextmanager
    def applying(self, optimizer, ok: torch.Tensor) -> Iterator[None]:
        """Around ``optimizer.step()``: the update is skipped where ``ok`` is False."""
        if self.loss_scaling:  # the scaler sets found_inf itself
            yield
            return
        opt = _torch_optimizer(optimizer)
        if opt.defaults.get("fused"):
            opt.grad_scale, opt.found_inf = None, (~ok).to(torch.float32)
            try:
                yield
            finally:
                del opt.grad_scale, opt.found_inf
            return
        if bool(ok):  # no device-side skip in this optimizer: one host read of the verdict
            yield
            return
        # Skipped: step() with no gradients leaves every parameter (and its state) alone.
        saved = [(p, p.grad) for group in opt.param_groups for p in group["params"]]
        for p, _ in saved:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in saved:
                p.grad = grad

    def end_step(self, step: int, ok: torch.Tensor) -> None:
        """After the optimizer step that made it ``step`` steps: count it (``ok``: all updates applied)."""
        bad = (~ok).long()
        total, streak, first = self.counts.unbind()
        streak = (streak + 1) * bad
        first = torch.where((first < 0) & (streak >= self.max_consecutive), torch.full_like(first, step), first)
        self.counts = torch.stack([total + bad, streak, first])
        self._step_ok = torch.ones((), dtype=torch.bool, device=self.device)

    # -- reading ------------------------------------------------------------------------------
    def read(self, accelerator) -> Tuple[int, int, Optional[int]]:
        """(total skipped, current streak, the step at which the streak reached the limit or None),
        the max over all processes (one host read; a collective with several processes)."""
        counts = self.counts.clone()
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        total, streak, first = counts.tolist()
        return int(total), int(streak), (int(first) if first >= 0 else None)
