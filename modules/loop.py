"""The one training loop of the three trainers.

A trainer builds its models, optimizers and data, then hands the loop a *step function*:
``step_fn(batch, step)`` computes the losses of one micro-batch and yields a :class:`Backward`
per loss, naming the :class:`Update` (optimizer) it trains. The loop owns everything the trainers
share, written once:

- gradient accumulation (``accelerator.accumulate``), backward, per-optimizer gradient clipping,
  optimizer step and zeroing;
- after each optimizer step: the LR schedules and EMAs advance, unless the optimizer skipped the
  step (fp16 loss scaling found inf/NaN gradients: the weights did not change, so neither do the
  schedule and the average); skipped steps are counted (``skipped_steps`` in the logs);
- logging every ``logging_steps`` and at the last step: the means of the step function's detached
  logs over the window, gathered over processes in one host sync, plus the LR each optimizer used,
  gradient norms, epoch, and speed: ``images_per_second`` (all processes), ``tflops`` (model
  FLOP/s of one device, in TFLOP/s) and ``mfu`` (``tflops`` over ``peak_tflops``). The model FLOPs
  of a step (forward and backward of every network the step function runs, counted by
  ``torch.utils.flop_counter``: matmuls, convolutions, attention) are counted once, in the first
  optimizer step of a fresh run, and kept in the checkpoints;
- validation / sample grids every ``validate_every`` steps and at the last step;
- checkpoints every ``checkpoint_every`` steps, every ``checkpoint_every_minutes``, at the last
  step and at ``--stop_after_steps``; none with non-finite weights (the last good one stays);
- SIGTERM / SIGINT: the step in flight finishes, a checkpoint is written, the run ends with
  :class:`modules.errors.Interrupted` (:mod:`modules.preemption`; all ranks stop at one step);
- non-finite losses or gradients: the update is skipped on the device and counted
  (``nonfinite_steps`` in the logs); ``max_consecutive_nonfinite`` in a row stop the run with a
  message naming the step (:mod:`modules.nonfinite`);
- the data position (epoch, micro-batches consumed) for an exact resume mid-epoch;
- at the end: ``export()`` (all processes call it; it writes on the main process), the loss plot,
  the tracker's end.

The epoch reaches DataLoader workers through the sampler's ``(epoch, index)`` keys
(``modules/data_loading.py``); the loop only calls ``loader.set_epoch``.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from modules.accelerator import gather_mean
from modules.checkpoints import CheckpointManager, TrainerState
from modules.ema import EMA
from modules.errors import Interrupted, UserError
from modules.metrics import MetricsLogger, progress_bar
from modules.nonfinite import NonFiniteGuard, all_finite
from modules.preemption import StopAgreement, StopSignals

logger = logging.getLogger("ldm")

LogValue = Union[torch.Tensor, float]


@dataclass(eq=False)
class Update:
    """One optimizer of a trainer and what follows each of its steps.

    name: prefix of its logs ("" gives ``lr``/``grad_norm``; "disc" gives ``disc_lr``/``disc_grad_norm``).
    optimizer: the prepared optimizer. parameters: what it trains (clipped together).
    scheduler: its LR schedule (stepped after each step it really took), or None.
    max_grad_norm: clip the gradient norm of ``parameters`` to this; None: no clipping.
    emas: (EMA, live unwrapped module) pairs folded in after each step it really took.
    after_step: called after each step it took (e.g. stage 0 keeps its head weights >= 0).
    """

    name: str
    optimizer: Any
    parameters: Sequence[torch.nn.Parameter]
    scheduler: Optional[Any] = None
    max_grad_norm: Optional[float] = None
    emas: Sequence[Tuple[EMA, torch.nn.Module]] = ()
    after_step: Optional[Callable[[], None]] = None

    def key(self, what: str) -> str:
        return f"{self.name}_{what}" if self.name else what


@dataclass
class Backward:
    """What a step function yields: a loss to backpropagate into ``update``'s parameters, and its
    logs (detached scalars, ideally tensors: nothing is read back to the host before logging)."""

    update: Update
    loss: torch.Tensor
    logs: Mapping[str, LogValue] = field(default_factory=dict)


StepFn = Callable[[Any, int], Iterable[Backward]]


@dataclass
class LoopConfig:
    """Cadences and sizes of a run (all counted in optimizer steps).

    images_per_step: images (or triplets) per optimizer step over all processes and micro-batches,
    for the images/s figure. per_gpu_batch_size: one process's micro-batch (recorded in checkpoints).
    stop_after_steps: checkpoint and stop after this many steps of this invocation
    (``--stop_after_steps``). validate_every: None for no periodic validation. peak_tflops: one
    device's peak (TFLOP/s) for the MFU figure; None: MFU is not logged (``tflops`` still is).
    checkpoint_every_minutes: also checkpoint when this much time has passed since the last one
    (``--checkpoint_every_minutes``). stop_check_steps: how often several ranks agree on a stop
    (``--stop_check_steps``). max_consecutive_nonfinite: skipped non-finite steps in a row that
    stop the run.
    """

    total_steps: int
    logging_steps: int
    checkpoint_every: int
    images_per_step: int
    per_gpu_batch_size: int
    validate_every: Optional[int] = None
    stop_after_steps: Optional[int] = None
    desc: str = "train"
    plot_keys: Sequence[str] = ("loss", "lr")
    peak_tflops: Optional[float] = None
    checkpoint_every_minutes: Optional[float] = None
    stop_check_steps: int = 10
    max_consecutive_nonfinite: int = 10


# training_args keys that every YAML-configured trainer has, with one meaning (README: "one loop").
LOOP_KEYS_AT_LEAST_ONE = ("total_training_iterations", "per_gpu_batch_size", "gradient_accumulation_steps",
                          "checkpoint_iterations", "logging_steps", "val_generation_freq")


def check_at_least(args: Any, keys: Sequence[str], minimum: int) -> None:
    """Each of ``keys`` of a config dataclass must be >= ``minimum`` (ValueError naming the key)."""
    for key in keys:
        if getattr(args, key) < minimum:
            raise ValueError(f"{key} must be >= {minimum}, got {getattr(args, key)}")


def check_clip_norm(args: Any, key: str) -> None:
    """A gradient-clipping threshold: > 0, or null for no clipping."""
    value = getattr(args, key)
    if value is not None and not value > 0:
        raise ValueError(f"{key} must be > 0 or null (no clipping), got {value}")


def check_loop_keys(args: Any) -> None:
    """Validate the shared keys of a trainer's ``training_args`` (raises ValueError naming the key);
    also turns YAML's bare ``no``/``yes`` (read as booleans) into mixed_precision ``no``/``auto``."""
    check_at_least(args, LOOP_KEYS_AT_LEAST_ONE + ("max_consecutive_nonfinite",), 1)
    check_at_least(args, ("lr_warmup_steps", "num_workers"), 0)
    if not args.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {args.learning_rate}")
    check_clip_norm(args, "max_grad_norm")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 or null (keep all), got {args.checkpoints_total_limit}")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {args.ema_decay}")
    if isinstance(args.mixed_precision, bool):
        args.mixed_precision = "auto" if args.mixed_precision else "no"
    args.check_speed_keys()


class _Window:
    """The logs since the last logging step, kept as device tensors (or floats) until then."""

    def __init__(self) -> None:
        self.values: Dict[str, List[LogValue]] = {}

    def add(self, logs: Mapping[str, LogValue]) -> None:
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else value)

    def means(self) -> Dict[str, torch.Tensor]:
        out = {}
        for key, values in self.values.items():
            tensors = [torch.as_tensor(v, dtype=torch.float32).to(_device_of(values)).reshape(()) for v in values]
            out[key] = torch.stack(tensors).float().mean()
        return out


def _device_of(values: Sequence[LogValue]) -> torch.device:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def clip_gradients(accelerator, update: Update) -> torch.Tensor:
    """Clip ``update``'s gradient norm; returns the norm before clipping (a device tensor).

    Unscales only this optimizer's fp16 gradients: ``accelerator.clip_grad_norm_`` unscales every
    prepared optimizer, which breaks a trainer with two (the second unscale of one step raises).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.clip_grad_norm_(update.parameters, update.max_grad_norm)
    accelerator.unscale_gradients(optimizer=update.optimizer)
    return torch.nn.utils.clip_grad_norm_(update.parameters, update.max_grad_norm)


def loss_scale(accelerator) -> Optional[torch.Tensor]:
    """The fp16 loss scaler's current scale (a copy), or None without loss scaling."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async()  # the device tensor: no host sync here
    return torch.tensor(scaler.get_scale()) if scale is None else scale.clone()


def optimizer_step(accelerator, update: Update) -> bool:
    """``update.optimizer.step()``; returns whether the weights were left alone because fp16 loss
    scaling found inf/NaN gradients. The scaler halves its scale exactly then. (Accelerate's own
    ``step_was_skipped`` misses it for fused optimizers, whose kernel skips the update itself.)"""
    before = loss_scale(accelerator) if accelerator.sync_gradients else None
    update.optimizer.step()
    if before is None:
        return False
    after = loss_scale(accelerator)
    return bool(after < before)  # one host sync per optimizer step, with fp16 loss scaling only


def train_loop(
    accelerator,
    *,
    loader,
    models: Sequence[torch.nn.Module],
    step_fn: StepFn,
    state: TrainerState,
    config: LoopConfig,
    checkpoints: CheckpointManager,
    metrics_log: MetricsLogger,
    validate: Optional[Callable[[int], None]] = None,
    export: Optional[Callable[[TrainerState], None]] = None,
) -> bool:
    """Train from ``state`` (fresh or resumed) to ``config.total_steps``; returns True when finished
    (and exported), False when stopped early by ``stop_after_steps`` (a checkpoint was written).
    Raises :class:`Interrupted` after the checkpoint of a SIGTERM / SIGINT, and :class:`UserError`
    when too many steps in a row were non-finite or the weights are no longer finite.

    models: the prepared modules being trained (put in train mode; their gradients are not synced
    between the micro-batches of an accumulation). validate(step): writes samples / validation
    metrics, called on every process.
    """
    from accelerate import skip_first_batches

    from torch.utils.flop_counter import FlopCounterMode

    cfg = config
    check_resume_shape(accelerator, state, cfg.per_gpu_batch_size)
    # One process's model FLOPs per optimizer step: counted in the first step of a fresh run and kept in
    # the checkpoints, so that a resumed run does not count again (it would not be bit-identical:
    # counting runs the step's ops through a dispatch mode).
    flop_counter, flops_per_step = FlopCounterMode(display=False), state.flops_per_step or None
    counted_flops = 0
    window = _Window()
    bar = progress_bar(accelerator, cfg.total_steps, initial=state.step, desc=cfg.desc)
    steps_this_run, train_seconds, timed_steps = 0, 0.0, 0
    # The optimizers stepped in the current accumulation window, by id: (update, whether fp16 loss
    # scaling skipped its real step, which is the window's last micro-batch).
    stepped: Dict[int, Tuple[Update, bool]] = {}
    lrs: Dict[str, float] = {}
    finished = state.step >= cfg.total_steps
    stopping = False
    interrupted: Optional[int] = None  # the signal all ranks agreed to stop on
    scaler = getattr(accelerator, "scaler", None)
    guard = NonFiniteGuard(accelerator.device, cfg.max_consecutive_nonfinite,
                           loss_scaling=scaler is not None and scaler.is_enabled())
    nonfinite_before = state.nonfinite_steps  # the checkpoint's count; the guard counts this invocation's
    signals = StopSignals()
    agreement = StopAgreement(accelerator, signals, cfg.stop_check_steps, cfg.checkpoint_every_minutes)

    def read_guard() -> None:
        """Bring the guard's counts to the host; stop the run after too many non-finite steps."""
        total, _, limit_step = guard.read(accelerator)
        state.nonfinite_steps = nonfinite_before + total
        if limit_step is not None:
            last = checkpoints.latest()
            raise UserError(
                f"step {limit_step}: {cfg.max_consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                f"gradient (skipped; {state.nonfinite_steps} in all), so the run stops. "
                f"The last checkpoint, {last.name if last else 'none'}, is untouched: lower the learning rate or check "
                "the data, then --resume_from_checkpoint latest (max_consecutive_nonfinite sets the limit)")

    def save_checkpoint() -> None:
        read_guard()
        if not all_finite([accelerator.unwrap_model(m) for m in models]):
            last = checkpoints.latest()
            raise UserError(f"step {state.step}: the weights are no longer finite (NaN or inf), so no checkpoint is "
                            f"written; the last good one, {last.name if last else 'none'}, is kept")
        checkpoints.save(state)
        agreement.saved()

    for model in models:
        model.train()
    tick = time.perf_counter()
    try:
        signals.__enter__()
        while not (finished or stopping):
            loader.set_epoch(state.epoch)  # reaches the EpochSampler: order and augmentation of this epoch
            batches = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
            for batch in batches:
                state.batch_in_epoch += 1
                step_ok: Optional[torch.Tensor] = None  # all updates of this optimizer step applied (device)
                counting = flops_per_step is None  # the run's first optimizer step: count its FLOPs
                with accelerator.accumulate(*models):
                    # Forward (the step function up to each yield) and backward are counted; the
                    # clipping and optimizer steps are not model FLOPs.
                    items = iter(step_fn(batch, state.step))
                    while True:
                        with flop_counter if counting else contextlib.nullcontext():
                            item = next(items, None)
                            if item is not None:
                                accelerator.backward(item.loss)
                        if counting:
                            counted_flops += flop_counter.get_total_flops()  # the counter restarts at each `with`
                        if item is None:
                            break
                        update = item.update
                        guard.note_loss(item.loss)
                        if accelerator.sync_gradients:
                            norm = None
                            if update.max_grad_norm is not None:
                                norm = clip_gradients(accelerator, update)
                                window.add({update.key("grad_norm"): norm})
                            ok = guard.verdict(norm, update.parameters)
                            step_ok = ok if step_ok is None else step_ok & ok
                            with guard.applying(update.optimizer, ok):
                                stepped[id(update)] = (update, optimizer_step(accelerator, update))
                        else:
                            stepped[id(update)] = (update, optimizer_step(accelerator, update))  # accelerate: no-op
                        update.optimizer.zero_grad(set_to_none=True)
                        window.add(item.logs)
                if not accelerator.sync_gradients:
                    continue
                if counting:
                    flops_per_step = state.flops_per_step = counted_flops
                    logger.info("model FLOPs per optimizer step: %.4g TFLOP per process (%.4g GFLOP per image)",
                                flops_per_step / 1e12,
                                flops_per_step * accelerator.num_processes / cfg.images_per_step / 1e9)

                # -- one optimizer step done ------------------------------------------------
                skipped = False
                for update, update_skipped in stepped.values():
                    if update.scheduler is not None:
                        lrs[update.key("lr")] = update.scheduler.get_last_lr()[0]  # the LR this step used
                    if update_skipped:
                        skipped = True
                        continue
                    if update.scheduler is not None:
                        update.scheduler.step()
                    if update.after_step is not None:
                        update.after_step()
                    for ema, module in update.emas:
                        ema.update(module, state.step + 1, apply=step_ok)
                stepped.clear()
                state.step += 1
                state.skipped_steps += int(skipped)
                if step_ok is not None:
                    guard.end_step(state.step, step_ok)
                steps_this_run += 1
                now = time.perf_counter()
                train_seconds, timed_steps = train_seconds + (now - tick), timed_steps + 1
                bar.update(1)
                finished = state.step >= cfg.total_steps
                stopping = cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps and not finished
                signum, checkpoint_due = agreement.check(state.step)
                if signum is not None and not finished:
                    interrupted, stopping = signum, True

                if state.step % cfg.logging_steps == 0 or finished or stopping:
                    read_guard()
                    means = gather_mean(accelerator, window.means())
                    means.update(lrs)
                    means["epoch"] = state.epoch
                    means["skipped_steps"] = state.skipped_steps
                    means["nonfinite_steps"] = state.nonfinite_steps
                    means.update(speed(cfg, flops_per_step, timed_steps, train_seconds))
                    metrics_log.log(means, state.step)
                    shown = {k: f"{means[k]:.4f}" for k in ("loss", "total", "rec") if k in means}
                    shown["img/s"] = f"{means['images_per_second']:.4g}"
                    if "mfu" in means:
                        shown["mfu"] = f"{means['mfu']:.1%}"
                    bar.set_postfix(**shown, epoch=state.epoch)
                    window, train_seconds, timed_steps = _Window(), 0.0, 0
                if validate is not None and interrupted is None and (
                        finished or (cfg.validate_every and state.step % cfg.validate_every == 0)):
                    validate(state.step)
                if state.step % cfg.checkpoint_every == 0 or finished or stopping or checkpoint_due:
                    save_checkpoint()
                tick = time.perf_counter()  # checkpoints and validation are not training time
                if finished or stopping:
                    break
            else:  # the epoch's batches are exhausted
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        signals.__exit__()
        bar.close()  # also on errors, so that an error message starts on a line of its own

    if interrupted is not None:
        if accelerator.is_main_process:
            logger.warning("stopped by %s at step %d of %d: saved %s; continue with --resume_from_checkpoint latest",
                           signal.Signals(interrupted).name, state.step, cfg.total_steps,
                           checkpoints.run_dir / f"checkpoint_{state.step}")
    elif stopping:
        logger.info("stopped at step %d of %d (--stop_after_steps %d); continue with --resume_from_checkpoint latest",
                    state.step, cfg.total_steps, cfg.stop_after_steps)
    elif export is not None:
        export(state)
    if accelerator.is_main_process:
        metrics_log.plot(cfg.plot_keys)
    # Every rank waits for rank 0's export before the tracker ends: end_training() also destroys the
    # process group, so no collective may follow it.
    accelerator.wait_for_everyone()
    metrics_log.finish()
    if interrupted is not None:
        raise Interrupted(interrupted, state.step, checkpoints.run_dir / f"checkpoint_{state.step}")
    return not stopping


SPEED_KEYS = ("images_per_second", "tflops", "mfu")  # the logged keys that are measured time, not the run's numbers


def speed(cfg: LoopConfig, flops_per_step: Optional[int], steps: int, seconds: float) -> Dict[str, float]:
    """images/s of all processes; model TFLOP/s of one device and its MFU (when the peak is known)."""
    seconds = max(seconds, 1e-9)
    out = {"images_per_second": cfg.images_per_step * steps / seconds}
    if flops_per_step:
        out["tflops"] = flops_per_step * steps / seconds / 1e12
        if cfg.peak_tflops:
            out["mfu"] = out["tflops"] / cfg.peak_tflops
    return out


def check_resume_shape(accelerator, state: TrainerState, per_gpu_batch_size: int) -> None:
    """Record the number of processes and the micro-batch size in ``state`` (checkpoints store them);
    a checkpoint made with others resumes, but not at exactly the same sample: say so."""
    saved = (state.num_processes, state.per_gpu_batch_size)
    now = (accelerator.num_processes, per_gpu_batch_size)
    if state.step > 0 and saved != (0, 0) and saved != now:
        state.flops_per_step = 0  # another micro-batch per process: counted again
        logger.warning("resuming a checkpoint made with %d process(es) x %d images per micro-batch on %d x %d: "
                       "training continues, but the data position of the epoch (and so the exact samples) differs "
                       "from an uninterrupted run", *saved, *now)
    state.num_processes, state.per_gpu_batch_size = now
