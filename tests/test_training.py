"""Shared training plumbing: checkpoints (atomic, rotated, exact resume), export, LR, EMA, metrics."""
import json

import pytest
import torch

from modules.ema import EMA
from modules.errors import UserError
from modules.training import (
    CheckpointManager,
    MetricsLogger,
    TrainerState,
    build_accelerator,
    build_adamw,
    build_dataloader,
    build_lr_scheduler,
    export_safetensors,
    gather_mean,
    lr_multiplier,
    read_export,
    resolve_mixed_precision,
)


def toy_run(run_dir, total_steps, stop_after=None, resume=None, limit=None):
    """A miniature trainer with the same structure as the stage scripts."""
    accelerator = build_accelerator(seed=3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=total_steps)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    loader = build_dataloader(data, batch_size=4, shuffle=True, num_workers=0, drop_last=True, seed=3)
    ema = EMA(model, decay=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler, ema)
    manager = CheckpointManager(accelerator, run_dir, total_limit=limit)
    if resume is None:
        manager.check_fresh_start()
    state = manager.resume(resume)
    done_here = 0
    while state.step < total_steps:
        loader.set_epoch(state.epoch)
        from accelerate import skip_first_batches
        batches = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            ema.update(accelerator.unwrap_model(model), state.step)
            done_here += 1
            if state.step % 3 == 0 or (stop_after and done_here == stop_after):
                manager.save(state)
            if state.step >= total_steps or (stop_after and done_here == stop_after):
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    return accelerator.unwrap_model(model), ema, state, manager


def test_resume_equals_uninterrupted(tmp_path):
    full, full_ema, _, _ = toy_run(tmp_path / "a", total_steps=14)
    toy_run(tmp_path / "b", total_steps=14, stop_after=8)
    resumed, resumed_ema, state, _ = toy_run(tmp_path / "b", total_steps=14, resume="latest")
    assert state.step == 14
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(full_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoints_rotate_and_refuse_to_overwrite(tmp_path):
    _, _, _, manager = toy_run(tmp_path, total_steps=10, limit=2)
    assert [step for step, _ in manager.checkpoints()] == [6, 9]
    names = sorted(p.name for p in (tmp_path).iterdir())
    assert names == ["checkpoint_6", "checkpoint_9"]
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
    with pytest.raises(UserError, match="expected 'unet'"):
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


def test_mixed_precision_on_cpu_uses_bf16():
    assert resolve_mixed_precision("no", cpu=True) == "no"
    assert resolve_mixed_precision("fp16", cpu=True) == "bf16"
    assert resolve_mixed_precision("auto", cpu=True) == "bf16"
    with pytest.raises(UserError, match="mixed_precision must be one of"):
        resolve_mixed_precision("fp8x", cpu=True)


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
