"""Exponential moving average of a model's weights (Polyak averaging).

``ema = decay_t * ema + (1 - decay_t) * param`` after every optimizer step, with an optional
warm-up of the decay, ``decay_t = min(decay, (1 + n) / (10 + n))`` where ``n`` counts the
updates since ``start_step`` (the form used by diffusers' EMAModel with ``use_ema_warmup=False``
and by the LDM code base): early on, when the weights move fast, the average follows them closely.
Buffers (e.g. BatchNorm statistics) are copied, not averaged.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn


class EMA:
    """An averaged copy of ``model``; ``update(model, step)`` after each optimizer step.

    It has ``state_dict``/``load_state_dict`` so ``accelerator.register_for_checkpointing`` saves
    and restores it with the rest of a checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, start_step: int = 0,
                 update_every: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.start_step = start_step
        self.update_every = update_every
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, apply: Optional[torch.Tensor] = None) -> None:
        """Fold ``model``'s weights in, if ``step`` (optimizer steps done) calls for it.

        ``apply``: a 0-dim bool device tensor; where False (the optimizer step was skipped, see
        :mod:`modules.nonfinite`) nothing is folded in, decided on the device (no host read).
        """
        if step < self.start_step:
            self.copy_from(model)
            return
        if step % self.update_every != 0:
            return
        decay = self.current_decay()
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach().to(dtype=e.dtype) for p, e in zip(model.parameters(), ema_params)]
        if apply is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        else:
            by_kind: Dict[Any, torch.Tensor] = {}  # one weight tensor per (device, dtype)
            weights = [by_kind.setdefault((e.device, e.dtype), (1.0 - decay) * apply.to(device=e.device, dtype=e.dtype))
                       for e in ema_params]
            torch._foreach_lerp_(ema_params, params, weights)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(torch.where(apply.to(ema_buf.device), buf, ema_buf) if apply is not None else buf)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())

    def to(self, device: torch.device) -> "EMA":
        self.model.to(device)
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
