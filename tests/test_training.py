"""Shared training plumbing: the loop (accumulation, skipped steps, epochs reaching workers, exact
resume), checkpoints (atomic, rotated), export, LR, EMA, metrics (wandb resume)."""
import json
import logging
from pathlib import Path

import pytest
import torch

import modules.accelerator as accelerator_module
from modules.accelerator import (HALF_PRECISION, build_accelerator, cpu_has_bf16_kernels, gather_mean,
                                 resolve_mixed_precision)
from modules.checkpoints import CheckpointManager
from modules.data_loading import EpochSampler, EpochSeeded, build_dataloader
from modules.ema import EMA
from modules.errors import UserError
from modules.export import export_safetensors, read_export
from modules.loop import Backward, LoopConfig, Update, train_loop
from modules.metrics import WANDB_ID_FILE, MetricsLogger
from modules.optim import build_adamw, build_lr_scheduler, lr_multiplier


class NoisyPairs(torch.utils.data.Dataset):
    """(x, y) pairs plus a draw from torch's global RNG: the stand-in of a random augmentation."""

    def __init__(self, n=24):
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=generator), torch.randn(n, 1, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index] + 0.1 * torch.randn(4), "y": self.y[index], "index": index}


def toy_run(run_dir, total_steps, stop_after=None, resume=None, limit=None, accumulation=1, num_workers=0,
            seen=None, skip_at=(), checkpoint_every=3, peak_tflops=None):
    """A miniature trainer with the stage scripts' structure, driven by the shared loop.

    seen: a list that receives (step, indices, x) of every micro-batch the step function gets.
    skip_at: optimizer steps (0-based) whose loss is made infinite, under a real fp16-style loss
    scaler (torch's GradScaler on the CPU), which then skips the update and halves its scale.
    """
    accelerator = build_accelerator(seed=3, gradient_accumulation_steps=accumulation)
    if skip_at:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # as accelerate sets up fp16
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    ema = EMA(model, decay=0.9)
    optimizer = build_adamw(model.parameters(), lr=1e-2)  # fused, as in the trainers
    scheduler = build_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=total_steps)
    loader = build_dataloader(EpochSeeded(NoisyPairs(), seed=3), batch_size=4, shuffle=True,
                              num_workers=num_workers, drop_last=True, seed=3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler, ema)
    manager = CheckpointManager(accelerator, run_dir, total_limit=limit)
    if resume is None:
        manager.check_fresh_start()
    state = manager.resume(resume)
    metrics = MetricsLogger(accelerator, run_dir)
    metrics.truncate_after(state.step)
    update = Update("", optimizer, list(model.parameters()), scheduler, max_grad_norm=None if skip_at else 1.0,
                    emas=[(ema, accelerator.unwrap_model(model))])

    def step_fn(batch, step):
        if seen is not None:
            seen.append((step, batch["index"].tolist(), batch["x"].clone()))
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if step in skip_at:
            loss = loss * float("inf")
        yield Backward(update, loss, {"loss": loss.detach()})

    config = LoopConfig(total_steps=total_steps, logging_steps=2, checkpoint_every=checkpoint_every,
                        images_per_step=4 * accumulation, per_gpu_batch_size=4, stop_after_steps=stop_after,
                        peak_tflops=peak_tflops)
    train_loop(accelerator, loader=loader, models=[model], step_fn=step_fn, state=state, config=config,
               checkpoints=manager, metrics_log=metrics)
    return accelerator.unwrap_model(model), ema, state, manager, scheduler


@pytest.mark.parametrize("accumulation,num_workers", [(1, 0), (2, 2)])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, accumulation, num_workers):
    """Stopped after 4 steps (mid-epoch) and resumed: the same batches, weights, EMA and LR."""
    seen_full, seen_parts = [], []
    full, full_ema, _, _, full_sched = toy_run(tmp_path / "a", 14, accumulation=accumulation,
                                               num_workers=num_workers, seen=seen_full)
    toy_run(tmp_path / "b", 14, stop_after=4, accumulation=accumulation, num_workers=num_workers, seen=seen_parts)
    resumed, resumed_ema, state, _, sched = toy_run(tmp_path / "b", 14, resume="latest", accumulation=accumulation,
                                                    num_workers=num_workers, seen=seen_parts)
    assert state.step == 14 and sched.last_epoch == full_sched.last_epoch == 14
    assert [(s, i) for s, i, _ in seen_parts] == [(s, i) for s, i, _ in seen_full]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(seen_parts, seen_full))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(full_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(p, q)
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10, 12, 14]  # the stop at 4 is logged once, the last step always


def test_epoch_and_augmentation_reach_persistent_workers(tmp_path):
    """With 2 persistent workers, every epoch has its own order and its own random draws, and each
    epoch serves every sample once (6 batches of 4 = the 24 samples)."""
    seen = []
    toy_run(tmp_path, total_steps=18, num_workers=2, seen=seen, checkpoint_every=100)
    epochs = [seen[i:i + 6] for i in range(0, 18, 6)]
    for epoch in epochs:
        assert sorted(i for _, indices, _ in epoch for i in indices) == list(range(24))
    x_by_index = [{i: x[k] for _, indices, x in epoch for k, i in enumerate(indices)} for epoch in epochs]
    for index in range(24):  # the same sample, augmented differently in each epoch
        assert not torch.equal(x_by_index[0][index], x_by_index[1][index])
        assert not torch.equal(x_by_index[1][index], x_by_index[2][index])
    orders = [[i for _, indices, _ in epoch for i in indices] for epoch in epochs]
    assert orders[0] != orders[1] != orders[2]


def test_speed_logs_count_the_model_flops_of_a_step(tmp_path):
    """tflops and mfu: the FLOPs of one optimizer step (2 micro-batches through the two linear layers,
    forward and backward, as torch's FLOP counter counts them), times steps per second; MFU against
    the given peak; and none without a peak."""
    from torch.utils.flop_counter import FlopCounterMode

    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(reference(torch.randn(4, 4)), torch.randn(4, 1)).backward()
    flops_per_step = 2 * counter.get_total_flops()
    assert flops_per_step == 2 * (2 * 4 * 4 * 8 + 2 * 4 * 8 * 1 + 2 * 4 * 8 * 1 * 2 + 2 * 4 * 4 * 8)  # fwd, bwd

    toy_run(tmp_path / "peak", 4, accumulation=2, checkpoint_every=100, peak_tflops=2e-6)
    records = [json.loads(line) for line in (tmp_path / "peak" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        steps_per_second = r["images_per_second"] / 8
        assert r["tflops"] == pytest.approx(flops_per_step * steps_per_second / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops"] / 2e-6, rel=1e-6)
    toy_run(tmp_path / "no_peak", 2, checkpoint_every=100)
    record = json.loads((tmp_path / "no_peak" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["tflops"] > 0 and "mfu" not in record


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=5)
    sampler.set_epoch(2)
    first = list(sampler)
    assert all(epoch == 2 for epoch, _ in first) and sorted(i for _, i in first) == list(range(10))
    assert list(sampler) == first
    sampler.set_epoch(3)
    assert [i for _, i in sampler] != [i for _, i in first]
    with pytest.raises(TypeError, match="does not take"):
        build_dataloader(NoisyPairs(), 4, shuffle=True, num_workers=0, drop_last=True, seed=0)


def test_skipped_steps_leave_weights_schedule_and_ema_alone(tmp_path):
    """fp16 overflow steps (the loss scaler found inf gradients; the fused AdamW kernel skipped the
    update) advance neither the LR schedule nor the EMA, and are counted in the logs."""
    model, ema, state, _, scheduler = toy_run(tmp_path / "skip", 6, skip_at=(1, 2), checkpoint_every=100)
    assert state.step == 6 and state.skipped_steps == 2
    assert scheduler.last_epoch == 4  # 6 steps, 2 of them skipped
    assert ema.num_updates == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2, 2]
    _, plain_ema, plain_state, _, plain_scheduler = toy_run(tmp_path / "plain", 6, checkpoint_every=100)
    assert plain_scheduler.last_epoch == 6 and plain_ema.num_updates == 6 and plain_state.skipped_steps == 0


def test_wandb_run_is_resumed_with_the_run_folder(tmp_path, monkeypatch):
    """A resume continues the run folder's wandb run; a fresh start in the same folder makes a new one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for resumed in (False, True, False):
        accelerator = build_accelerator(seed=0, log_wandb=True, project_dir=tmp_path)
        metrics = MetricsLogger(accelerator, tmp_path, use_wandb=True, project_name="test", resumed=resumed)
        ids.append(accelerator.get_tracker("wandb", unwrap=True).id)
        metrics.log({"loss": 1.0}, step=len(ids))
        metrics.finish()
        assert (tmp_path / WANDB_ID_FILE).read_text().strip() == ids[-1]
    assert ids[0] == ids[1] != ids[2]


def test_checkpoints_rotate_and_refuse_to_overwrite(tmp_path):
    _, _, _, manager, _ = toy_run(tmp_path, total_steps=10, limit=2)
    assert [step for step, _ in manager.checkpoints()] == [9, 10]
    names = sorted(p.name for p in (tmp_path).iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint_10", "checkpoint_9"]
    state = json.loads((tmp_path / "checkpoint_9" / "trainer_state.json").read_text())
    assert state["step"] == 9
    with pytest.raises(UserError, match="already holds 2 checkpoint"):
        toy_run(tmp_path, total_steps=10)


def test_interrupted_save_is_never_latest(tmp_path):
    accelerator = build_accelerator(seed=0)
    manager = CheckpointManager(accelerator, tmp_path)
    (tmp_path / "checkpoint_5").mkdir(parents=True)
    (tmp_path / "checkpoint_5" / "trainer_state.json").write_text('{"step": 5}')
    (tmp_path / "checkpoint_9.tmp").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint_12").mkdir()     # no trainer_state.json: incomplete
    assert manager.latest() == tmp_path / "checkpoint_5"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        manager.resolve(str(tmp_path / "checkpoint_12"))
    with pytest.raises(UserError, match="no such checkpoint folder"):
        manager.resolve(str(tmp_path / "missing"))
    assert CheckpointManager(accelerator, tmp_path / "new").resolve("latest") is None


def test_export_round_trip_and_metadata(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = export_safetensors(tensors, tmp_path / "model.safetensors", kind="vae",
                              metadata={"config": {"a": [1, 2]}, "step": 7})
    loaded, meta = read_export(path, expected_kind="vae")
    assert torch.equal(loaded["w"], tensors["w"])
    assert meta["config"] == {"a": [1, 2]} and meta["step"] == 7 and meta["kind"] == "vae"
    with pytest.raises(UserError, match=r"is a stage-1 VAE export \(stage1_vae_trainer.py's <working_directory>/"
                                         r"model.safetensors\); expected an export of kind 'unet'"):
        read_export(path, expected_kind="unet")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_export(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="weights file not found"):
        read_export(tmp_path / "none.safetensors")


def test_build_adamw_is_fused_adamw_with_the_same_updates():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]

    def train(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return opt, params

    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    fused, fused_params = train(lambda ps: build_adamw(ps, **kwargs))
    plain, plain_params = train(lambda ps: torch.optim.AdamW(ps, **kwargs))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(fused_params[0].detach(), weights[0])  # the steps did move the weights
    # No fused kernel for this device type: the default implementation, same interface.
    meta = build_adamw([torch.nn.Parameter(torch.empty(3, device="meta"))], lr=1e-3)
    assert not meta.defaults["fused"]


def test_lr_multiplier_shapes():
    assert lr_multiplier(0, "linear", 4, 20) == pytest.approx(0.25)
    assert lr_multiplier(3, "linear", 4, 20) == pytest.approx(1.0)
    assert lr_multiplier(12, "linear", 4, 20) == pytest.approx(0.5)
    assert lr_multiplier(20, "cosine", 0, 20) == pytest.approx(0.0)
    assert lr_multiplier(10, "cosine", 0, 20) == pytest.approx(0.5)
    # hold at full LR, then linear decay (stage 0: num_epochs then decay_epochs)
    assert lr_multiplier(9, "linear", 0, 15, hold_steps=10) == 1.0
    assert lr_multiplier(12, "linear", 0, 15, hold_steps=10) == pytest.approx(0.6)
    with pytest.raises(UserError, match="lr_scheduler must be one of"):
        lr_multiplier(0, "step", 0, 10)


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 1)
    ema = EMA(model, decay=0.99, warmup=True)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    d = min(0.99, 1 / 10)
    assert torch.allclose(ema.model.weight, d * start + (1 - d) * model.weight)
    before = ema.model.weight.clone()
    ema.update(model, step=2)
    d = min(0.99, 2 / 11)
    assert torch.allclose(ema.model.weight, d * before + (1 - d) * model.weight)
    no_warmup = EMA(model, decay=0.5, warmup=False)
    assert no_warmup.current_decay() == 0.5


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_mixed_precision_on_a_cpu_follows_the_bf16_kernels_the_cpu_has(monkeypatch, bf16_kernels):
    """auto is float32 on a CPU; fp16 and the bare flag's "half" are bf16 where oneDNN has bf16
    kernels for the CPU and float32 (said so) where not; an explicit bf16 is kept, with a warning."""
    monkeypatch.setattr(accelerator_module, "cpu_has_bf16_kernels", lambda: bf16_kernels)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("ldm").addHandler(handler)
    try:
        assert resolve_mixed_precision("no", cpu=True) == "no"
        assert resolve_mixed_precision(False, cpu=True) == "no"
        assert resolve_mixed_precision("auto", cpu=True) == "no"
        assert said == []
        half = "bf16" if bf16_kernels else "no"
        assert resolve_mixed_precision("fp16", cpu=True) == half
        assert resolve_mixed_precision(HALF_PRECISION, cpu=True) == half
        assert resolve_mixed_precision("bf16", cpu=True) == "bf16"
    finally:
        logging.getLogger("ldm").removeHandler(handler)
    if bf16_kernels:
        assert said == ["mixed precision fp16 on a CPU: running bf16 autocast instead (fp16 autocast needs a GPU)"]
    else:
        assert [s.split(":")[0] for s in said] == ["mixed precision fp16 on a CPU without bf16 kernels (oneDNN needs AVX512 for them)",
                                                   "mixed precision half on a CPU without bf16 kernels (oneDNN needs AVX512 for them)",
                                                   "mixed precision bf16 on a CPU without bf16 kernels (oneDNN needs AVX512 for them)"]
        assert "running float32" in said[0] and "running float32" in said[1] and "reference code" in said[2]
    with pytest.raises(UserError, match="mixed_precision must be one of"):
        resolve_mixed_precision("fp8x", cpu=True)


def test_bf16_kernels_is_what_the_linux_cpu_flags_say():
    """oneDNN's answer against the kernel's list of the CPU's instruction sets: on x86, bf16
    kernels need AVX512 (F, BW, VL, DQ: "avx512_core") or AVX-VNNI with AVX-NE-CONVERT; on ARM, BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.fail("this check reads /proc/cpuinfo (Linux)")
    lines = cpuinfo.read_text().splitlines()
    flags = set(next(line for line in lines if line.split(":")[0].strip() in ("flags", "Features")).split(":")[1].split())
    expected = ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags or {"avx_vnni", "avx_ne_convert"} <= flags
                or "bf16" in flags)
    assert cpu_has_bf16_kernels() == expected


def test_metrics_logger_writes_jsonl_truncates_on_resume_and_plots(tmp_path):
    accelerator = build_accelerator(seed=0)
    metrics = MetricsLogger(accelerator, tmp_path)
    for step in range(1, 6):
        metrics.log(gather_mean(accelerator, {"loss": 1.0 / step, "lr": torch.tensor(0.1)}), step=step)
    assert [r["step"] for r in metrics.read()] == [1, 2, 3, 4, 5]
    assert metrics.read()[1]["loss"] == pytest.approx(0.5)
    metrics.truncate_after(3)
    assert [r["step"] for r in metrics.read()] == [1, 2, 3]
    png = metrics.plot(["loss"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nonfinite_guard_skips_on_the_device_and_counts_streaks():
    """Fused AdamW skips through found_inf (no host read); an optimizer without it falls back to
    leaving the step out; the counts name the step at which the streak reached the limit."""
    from host_syncs import HostSyncCounter
    from modules.nonfinite import NonFiniteGuard

    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=True) if fused else torch.optim.SGD([p], lr=0.1, momentum=0.9)
        guard = NonFiniteGuard(torch.device("cpu"), max_consecutive=2)
        history = []
        for step, value in enumerate([1.0, float("nan"), float("inf"), 1.0, float("nan")], start=1):
            loss = (p * value).sum()
            loss.backward()
            guard.note_loss(loss)
            ok = guard.verdict(None, [p])
            with HostSyncCounter() as syncs:
                with guard.applying(opt, ok):
                    opt.step()
            assert (syncs.events == []) == fused  # the fallback reads the verdict once
            opt.zero_grad(set_to_none=True)
            guard.end_step(step, ok)
            history.append(p.detach().clone())
        assert not torch.equal(history[0], torch.ones(3))
        assert torch.equal(history[0], history[1]) and torch.equal(history[1], history[2])  # NaN, inf: skipped
        assert not torch.equal(history[2], history[3]) and torch.equal(history[3], history[4])
        assert all(torch.isfinite(h).all() for h in history)

        class One:
            num_processes = 1
        assert guard.read(One()) == (3, 1, 3)  # 3 skipped; the streak of 2 was reached at step 3
