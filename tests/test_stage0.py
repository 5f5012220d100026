"""Stage 0 end to end: the tutorial's command as written, learning on synthetic BAPPS, exact
resume, two processes, and every bad input as one line.

Runs offline on a CPU. Trees are tiny (64 px, written by ``write_synthetic_bapps``) and shared
per module; the trainer runs in-process where the test only needs its results, and in a
subprocess where the command line itself is under test (``accelerate launch``, exit codes).
Child processes get one OpenMP thread each: the test machine has two cores shared with other
runs, and oversubscribed OpenMP threads make every step many times slower.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import torchvision
import yaml

from conftest import OFFLINE_ENV, REPO_ROOT
from modules.accelerator import cpu_has_bf16_kernels
from modules.bapps import TWOAFC_CATEGORIES, TwoAFCDataset, write_synthetic_bapps
from modules.lpips import LPIPS, load_lpips_export, two_afc_score
from modules.loop import SPEED_KEYS

TRAINER = REPO_ROOT / "stage0_lpips_trainer.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
VAL_CATEGORIES = list(TWOAFC_CATEGORIES["val"])
TIMEOUT = 300

# The learning setting: a frozen random SqueezeNet trunk ("lin" mode on a
# trunk nobody pretrained), linear heads learned from the judgements at a high rate, 2 + 1 epochs.
LEARNING_FLAGS = ["--backbone", "squeeze", "--no-pretrained_backbone", "--use_dropout", "--img_size", "64",
                  "--batch_size", "25", "--initial_lr", "1e-2", "--num_epochs", "2", "--decay_epochs", "1",
                  "--middle_channels", "32", "--logging_steps", "4", "--seed", "0"]
# Resume and two processes: every kind of state moves (trunk and heads train, dropout draws,
# shuffling), on a 30-triplet tree: 6 steps per epoch with one process, 3 with two.
SMALL_FLAGS = ["--backbone", "squeeze", "--no-pretrained_backbone", "--train_backbone", "--use_dropout",
               "--img_size", "32", "--batch_size", "5", "--eval_batch_size", "2", "--initial_lr", "1e-3",
               "--num_epochs", "1", "--decay_epochs", "1", "--logging_steps", "3", "--num_workers", "0", "--seed", "3"]
SMALL_STEPS_PER_EPOCH = 6


# ---- helpers --------------------------------------------------------------------------------------
def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_in_process(argv: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """``stage0_lpips_trainer.main(argv)`` in this process, single-threaded, with a fresh accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    import stage0_lpips_trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return stage0_lpips_trainer.main(list(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_steps(run_dir: Path) -> List[int]:
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.suffix != ".tmp")


def table_rows(stdout: str) -> Dict[str, List]:
    """The evaluation table printed on stdout: {row label: numbers}, and {"category": column names}."""
    rows: Dict[str, List] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["category"]:
            rows["category"] = parts[1:]
        elif parts and "category" in rows:
            columns = len(rows["category"])
            rows[" ".join(parts[:-columns])] = [float(v) for v in parts[-columns:]]
    return rows


@torch.no_grad()
def two_afc_per_category(metric, root: Path, img_size: int) -> Dict[str, float]:
    """Mean 2AFC score of ``metric`` on each val category, computed here independently of the trainer."""
    scores = {}
    for category in VAL_CATEGORIES:
        dataset = TwoAFCDataset(root, "val", categories=[category], img_size=img_size)
        items = [dataset[i] for i in range(len(dataset))]
        ref, p0, p1, judge = (torch.stack([item[k] for item in items]) for k in ("ref", "p0", "p1", "judge"))
        scores[category] = two_afc_score(metric(ref, p0), metric(ref, p1), judge).mean().item()
    return scores


# ---- shared data -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    """30 training triplets (10 per category), 5 val triplets per category, 3 JND pairs per category."""
    root = tmp_path_factory.mktemp("bapps_tiny")
    write_synthetic_bapps(root, num_train_per_category=10, num_val_per_category=5, num_jnd_per_category=3,
                          img_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def learning_tree(tmp_path_factory) -> Path:
    """300 training triplets, 50 held-out val triplets per category (other images, other distortions)."""
    root = tmp_path_factory.mktemp("bapps_learning")
    write_synthetic_bapps(root, num_train_per_category=100, num_val_per_category=50, num_jnd_per_category=0,
                          img_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def vgg_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds torchvision's vgg16 weights file (random-init contents).

    torchvision checks the file's hash only when it downloads it, so any vgg16 state dict is served
    as "the pretrained weights". The classifier (unused by LPIPS, 470 MB as float32) is stored as
    expanded zeros, which torch.save writes as a single element: the file is the 59 MB trunk.
    """
    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(1234)
    model = torchvision.models.vgg16()
    state = {k: (v if k.startswith("features") else torch.zeros(()).expand(v.shape)) for k, v in model.state_dict().items()}
    path = home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home


# ---- 1. the tutorial's command, as written ------------------------------------------------------------
@pytest.fixture(scope="module")
def tutorial_run(tiny_tree, vgg_torch_home, tmp_path_factory):
    work = tmp_path_factory.mktemp("tutorial") / "work"
    command = [str(ACCELERATE), "launch", str(TRAINER), "--path_to_root", str(tiny_tree), "--work_dir", str(work),
               "--checkpoint_name", "lpips_64x64_vgg.pt", "--img_size", "64", "--batch_size", "25", "--num_workers", "32",
               "--num_epochs", "10", "--decay_epochs", "5", "--logging_steps", "250", "--pretrained_backbone", "--use_dropout",
               "--img_range", "minus_one_to_one", "--middle_channels", "32", "--eval_lpips_pkg", "--mixed_precision"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env(TORCH_HOME=str(vgg_torch_home)),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    yield work, result
    for checkpoint in (work / "LPIPSTrainer").glob("checkpoint_*"):  # 3 x 60 MB of frozen VGG: not kept
        shutil.rmtree(checkpoint)


def test_tutorial_command_writes_checkpoint_and_table(tutorial_run, vgg_torch_home):
    work, result = tutorial_run
    run_dir = work / "LPIPSTrainer"
    # 30 triplets at --batch_size 25: one step per epoch, 10 + 5 epochs, a resumable checkpoint each;
    # the default --checkpoints_total_limit 3 keeps the newest three.
    assert "training vgg LPIPS on 30 triplets: 15 epochs x 1 steps, 1 process(es)" in result.stderr
    assert checkpoint_steps(run_dir) == [13, 14, 15]
    # --mixed_precision on a CPU: bf16 autocast where oneDNN has bf16 kernels, float32 (said so) where not
    ran = "bf16" if cpu_has_bf16_kernels() else "no"
    if ran == "bf16":
        assert "mixed precision bf16 (fp32 weights, bf16 autocast) (asked: half)" in result.stderr
    else:
        assert "mixed precision no (asked: half)" in result.stderr
        assert "mixed precision half on a CPU without bf16 kernels" in result.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["mixed_precision"] == ran
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "eval_results.json"):
        assert (run_dir / name).is_file(), name

    # The table: six val categories in BAPPS order, their mean, the two JND rows and their mean;
    # the lpips package's column is there because the filled cache serves its vgg16 trunk too.
    rows = table_rows(result.stdout)
    assert rows["category"] == ["ours", "l2", "lpips_pkg"]
    assert list(rows)[1:] == VAL_CATEGORIES + ["2afc mean", "jnd/cnn", "jnd/traditional", "jnd mAP mean"]
    assert "not available" not in result.stderr
    results = json.loads((run_dir / "eval_results.json").read_text())
    for category in VAL_CATEGORIES + ["jnd/cnn", "jnd/traditional"]:
        assert rows[category] == [round(results[category][name], 4) for name in ("ours", "l2", "lpips_pkg")]
        assert all(0.0 <= v <= 1.0 for v in rows[category])
    assert rows["2afc mean"][0] == round(np.mean([results[c]["ours"] for c in VAL_CATEGORIES]), 4)

    # metrics.jsonl: --logging_steps 250 never fires in 15 steps; the end of the loop still logs.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 15 and {"loss", "accuracy", "lr"} <= set(records[0])
    # The LR the last step used: the linear decay over the last 5 of 15 steps gives it 1/5 of 1e-4.
    assert records[0]["lr"] == pytest.approx(2e-5)
    assert records[1]["2afc_mean/ours"] == pytest.approx(np.mean([results[c]["ours"] for c in VAL_CATEGORIES]))

    # The checkpoint and its safetensors copy rebuild the metric without any cache; the trunk is the
    # cached "pretrained" one, untouched (lin mode), and the heads are non-negative.
    cached = torch.load(vgg_torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth", weights_only=True)
    metric, metadata = load_lpips_export(work / "lpips_64x64_vgg.pt")
    copy, _ = load_lpips_export(work / "lpips_64x64_vgg.safetensors")
    assert metric.backbone == "vgg" and metric.pretrained_backbone and metric.use_dropout
    for key, value in metric.trunk.features.state_dict().items():
        assert torch.equal(value, cached["features." + key]), key
    for head in metric.heads:
        assert head.conv.weight.min() >= 0
    for (key, a), (_, b) in zip(metric.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), key
    assert metadata["step"] == 15 and "--pretrained_backbone" in metadata["producer"]["argv"]
    payload = torch.load(work / "lpips_64x64_vgg.pt", weights_only=True)
    assert payload["ranking_head"]["model.0.weight"].shape == (32, 5, 1, 1)  # --middle_channels 32


# ---- 2. learning -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned(learning_tree, tmp_path_factory):
    work = tmp_path_factory.mktemp("learning") / "work"
    results = run_in_process(["--path_to_root", str(learning_tree), "--work_dir", str(work), "--num_workers", "0",
                              *LEARNING_FLAGS])
    return work, results


def test_learned_metric_beats_untrained_and_l2_on_held_out_triplets(learned, learning_tree):
    work, results = learned
    ours = {c: results[c]["ours"] for c in VAL_CATEGORIES}
    l2 = {c: results[c]["l2"] for c in VAL_CATEGORIES}

    # The untrained metric: the same seed builds the same trunk and the same random heads.
    from accelerate.utils import set_seed

    set_seed(0)
    untrained_metric = LPIPS("squeeze", pretrained_backbone=False, use_dropout=True).eval()
    trained_metric, _ = load_lpips_export(work / "lpips.safetensors")
    for key, value in untrained_metric.trunk.state_dict().items():
        assert torch.equal(value, trained_metric.trunk.state_dict()[key]), key  # frozen trunk: only heads learned
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        untrained = two_afc_per_category(untrained_metric, learning_tree, 64)
    finally:
        torch.set_num_threads(threads)

    mean = {name: float(np.mean(list(s.values()))) for name, s in
            (("ours", ours), ("l2", l2), ("untrained", untrained))}
    print(f"\nstage-0 learning, held-out 2AFC (mean of 6 categories): {mean}")
    assert mean["ours"] >= mean["l2"] + 0.08, mean
    assert mean["ours"] >= mean["untrained"] + 0.2, mean
    assert sum(ours[c] > l2[c] for c in VAL_CATEGORIES) >= 5, (ours, l2)
    # The loss went down over training (gathered means logged every 4 steps).
    records = [json.loads(line) for line in (work / "LPIPSTrainer" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.02, losses


# ---- 3. resume -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tiny_tree, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted") / "work"
    results = run_in_process(["--path_to_root", str(tiny_tree), "--work_dir", str(work), *SMALL_FLAGS])
    return work, results


def test_resume_after_epoch_one_equals_uninterrupted_run(uninterrupted, tiny_tree, tmp_path):
    full_work, full_results = uninterrupted
    work = tmp_path / "work"
    common = ["--path_to_root", str(tiny_tree), "--work_dir", str(work), *SMALL_FLAGS]
    assert run_in_process([*common, "--stop_after_steps", str(SMALL_STEPS_PER_EPOCH)]) == {}
    assert checkpoint_steps(work / "LPIPSTrainer") == [SMALL_STEPS_PER_EPOCH]
    assert not (work / "lpips.safetensors").exists()
    resumed_results = run_in_process([*common, "--resume_from_checkpoint", "latest"])

    assert checkpoint_steps(work / "LPIPSTrainer") == checkpoint_steps(full_work / "LPIPSTrainer") == [6, 12]
    full, resumed = read_safetensors(full_work / "lpips.safetensors"), read_safetensors(work / "lpips.safetensors")
    assert sorted(full) == sorted(resumed)
    trunk_start = LPIPS("squeeze", pretrained_backbone=False).trunk.state_dict()
    moved = [k for k in trunk_start if not torch.equal(full["trunk." + k], trunk_start[k])]
    assert moved  # the trunk trained, so resuming had to restore it
    for key in full:
        assert torch.equal(full[key], resumed[key]), key  # bit-exact
    heads = [torch.load(w / "lpips.pt", weights_only=True)["ranking_head"] for w in (full_work, work)]
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key]), key
    assert resumed_results == full_results
    # The logged loss curve is the same line for line (logging every 3 steps, the stop at step 6);
    # only the measured speed differs.
    def curve(w):
        records = [json.loads(line) for line in (w / "LPIPSTrainer" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in SPEED_KEYS} for r in records]
    assert curve(work) == curve(full_work) and len(curve(work)) == 5


def test_sigkill_during_a_mid_epoch_save_then_resume_equals_uninterrupted_run(uninterrupted, tiny_tree, tmp_path):
    """With 2 loader workers and --checkpoint_every_minutes small enough to checkpoint after every step,
    the run is SIGKILLed while it writes checkpoint_5 (mid-epoch: 6 steps per epoch); ``accelerate
    launch ... --resume_from_checkpoint latest`` continues from checkpoint_4, mid-epoch, and ends with
    the uninterrupted run's weights and ranking head, bit for bit."""
    import signal

    from interrupts import kill_during_save_command, start, was_killed

    full_work, _ = uninterrupted
    work = tmp_path / "work"
    flags = [f for f in SMALL_FLAGS]
    flags[flags.index("--num_workers") + 1] = "2"
    common = ["--path_to_root", str(tiny_tree), "--work_dir", str(work), *flags, "--checkpoints_total_limit", "0"]
    killed = start(kill_during_save_command(str(TRAINER), [*common, "--checkpoint_every_minutes", "1e-6"], 5),
                   REPO_ROOT, child_env(), tmp_path / "logs")
    assert was_killed(killed.wait(TIMEOUT), signal.SIGKILL), killed.output()[-3000:]
    assert checkpoint_steps(work / "LPIPSTrainer") == [1, 2, 3, 4]
    assert (work / "LPIPSTrainer" / "checkpoint_5.tmp").is_dir()
    state = json.loads((work / "LPIPSTrainer" / "checkpoint_4" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 4)

    result = subprocess.run([str(ACCELERATE), "launch", "--num_processes", "1", "--num_machines", "1",
                             "--dynamo_backend", "no", str(TRAINER), *common, "--resume_from_checkpoint", "latest"],
                            cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "checkpoint_4 at step 4 (epoch 0, batch 4)" in result.stderr
    full, resumed = read_safetensors(full_work / "lpips.safetensors"), read_safetensors(work / "lpips.safetensors")
    assert sorted(full) == sorted(resumed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    heads = [torch.load(w / "lpips.pt", weights_only=True)["ranking_head"] for w in (full_work, work)]
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key]), key


# ---- 4. two processes -----------------------------------------------------------------------------------
# Runs the trainer's own main() under `accelerate launch`, recording on every rank which training
# triplets it loaded and the weights it ended with.
RANK_PROBE = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import torch
    import stage0_lpips_trainer as trainer
    from modules.bapps import TwoAFCDataset

    out, argv = sys.argv[1], sys.argv[2:]
    loaded, objectives = [], []
    get_item = TwoAFCDataset.__getitem__
    def logged_get_item(self, index):
        if self.split == "train":
            loaded.append(int(index))
        return get_item(self, index)
    TwoAFCDataset.__getitem__ = logged_get_item
    build = trainer.TwoAFCObjective.__init__
    def kept_build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        objectives.append(self)
    trainer.TwoAFCObjective.__init__ = kept_build
    trainer.main(argv)
    rank = int(os.environ["RANK"])
    torch.save(objectives[0].state_dict(), os.path.join(out, f"weights_rank{{rank}}.pt"))
    with open(os.path.join(out, f"train_indices_rank{{rank}}.json"), "w") as handle:
        json.dump(loaded, handle)
    """
)


@pytest.fixture(scope="module")
def two_process_run(tiny_tree, tmp_path_factory):
    base = tmp_path_factory.mktemp("two_processes")
    probe = base / "rank_probe.py"
    probe.write_text(RANK_PROBE.format(repo=str(REPO_ROOT)))
    work = base / "work"
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(probe), str(base),
               "--path_to_root", str(tiny_tree), "--work_dir", str(work), *SMALL_FLAGS]
    result = subprocess.run(command, cwd=REPO_ROOT, env=child_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, work, result


def test_two_processes_split_batches_sync_weights_and_gather_metrics(two_process_run, uninterrupted):
    base, work, result = two_process_run
    single_work, single_results = uninterrupted
    # Each process takes its own batches: the per-process step count halves at the same per-process
    # batch size, and the LR schedule (hold one epoch, decay one) follows the per-process steps.
    assert "on 30 triplets: 2 epochs x 3 steps, 2 process(es)" in result.stderr
    assert checkpoint_steps(work / "LPIPSTrainer") == [3, 6]
    assert checkpoint_steps(single_work / "LPIPSTrainer") == [6, 12]
    records = [json.loads(line) for line in (work / "LPIPSTrainer" / "metrics.jsonl").read_text().splitlines()]
    # The LR each logged step used: full for the first epoch, then 1 - 2/3 of it at the last step.
    assert [(r["step"], r["lr"]) for r in records if "lr" in r] == [(3, 1e-3), (6, pytest.approx(1e-3 / 3))]

    indices = [json.loads((base / f"train_indices_rank{rank}.json").read_text()) for rank in (0, 1)]
    for epoch in range(2):
        seen = [set(rank_indices[epoch * 15:(epoch + 1) * 15]) for rank_indices in indices]
        assert len(seen[0]) == len(seen[1]) == 15 and not seen[0] & seen[1]  # disjoint halves of the 30
    assert all(len(rank_indices) == 30 for rank_indices in indices)

    # Both ranks end with the same weights, ranking head included (one DDP module), equal to the export.
    weights = [torch.load(base / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    exported = read_safetensors(work / "lpips.safetensors")
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
        if key.startswith("metric."):
            assert torch.equal(weights[0][key], exported[key[len("metric."):]]), key

    # Gathered evaluation counts every val triplet exactly once: 5 per category at --eval_batch_size 2
    # leaves a padded last batch on one rank, yet the pixel baseline scores exactly as with one process.
    results = json.loads((work / "LPIPSTrainer" / "eval_results.json").read_text())
    assert list(results) == VAL_CATEGORIES + ["jnd/cnn", "jnd/traditional"]
    for category, row in results.items():
        assert row["l2"] == pytest.approx(single_results[category]["l2"], abs=1e-6), category
    assert result.stdout.count("2afc mean") == 1  # only the main process prints the table


# ---- 5. bad inputs: one line naming the path, exit code 2, no traceback ---------------------------------
BAD_INPUTS = {  # case -> (what the message says, where a PNG is read: only then it fails inside the loop)
    "missing_root": "does not exist",
    "no_2afc": "has no 2afc/ folder",
    "counts": "mismatched file counts: ref=10, p0=10, p1=9, judge=10",
    "judge": "holds 1.5, expected a fraction of humans in [0, 1]",
    "evaluation_only_without_checkpoint": "LPIPS checkpoint not found",
    "png_workers0": "cannot read image",
    "png_workers1": "cannot read image",  # raised in a DataLoader worker process
}
# An unreadable PNG fails inside the training loop; with --num_workers 1 in a DataLoader worker
# process, whose traceback must not reach the user: that case runs as its own
# `python stage0_lpips_trainer.py` process. The others go through the same run_main in this
# process (a process each would cost seconds of imports apiece).
SUBPROCESS_CASES = ("png_workers1",)
FAST_FLAGS = ["--backbone", "squeeze", "--img_size", "32", "--batch_size", "5", "--num_epochs", "1",
              "--decay_epochs", "0"]


@pytest.fixture(scope="module")
def bad_cases(tiny_tree, tmp_path_factory):
    """case -> (trainer argv, the path the error must name)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    cases = {"missing_root": (["--path_to_root", str(base / "nowhere")], base / "nowhere")}
    no_2afc = base / "no_2afc"
    shutil.copytree(tiny_tree / "jnd", no_2afc / "jnd")
    cases["no_2afc"] = (["--path_to_root", str(no_2afc)], no_2afc)
    for case, broken in (("counts", "2afc/train/cnn/p1/000004.png"), ("judge", "2afc/train/mix/judge/000002.npy"),
                         ("png_workers0", "2afc/train/cnn/p0/000003.png"),
                         ("png_workers1", "2afc/train/cnn/p0/000003.png")):
        root = base / case
        shutil.copytree(tiny_tree, root)
        if case == "counts":
            (root / broken).unlink()
            named = (root / broken).parent.parent
        elif case == "judge":
            np.save(root / broken, np.array([1.5], dtype=np.float32))
            named = root / broken
        else:
            (root / broken).write_bytes(b"\x89PNG\r\n\x1a\n but not really")
            named = root / broken
        cases[case] = (["--path_to_root", str(root)], named)
    cases["evaluation_only_without_checkpoint"] = (["--path_to_root", str(tiny_tree), "--evaluation_only"], None)
    for case, (argv, named) in cases.items():
        work = base / f"work_{case}"
        workers = "1" if case == "png_workers1" else "0"
        argv[:0] = ["--work_dir", str(work), *FAST_FLAGS, "--num_workers", workers]
        cases[case] = (argv, named if named is not None else work / "lpips.pt")
    return cases


@pytest.fixture(scope="module")
def subprocess_runs(bad_cases, learned, learning_tree, tmp_path_factory):
    """The subprocess cases, and one --evaluation_only run of the learned metric, started at once."""
    processes = {case: subprocess.Popen([sys.executable, str(TRAINER), *bad_cases[case][0]], cwd=REPO_ROOT,
                                        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for case in SUBPROCESS_CASES}
    # Re-evaluating the learned metric from its file, where the lpips package finds no cached trunk
    # and (through a proxy that refuses every connection) no network to download one from.
    learned_work, _ = learned
    argv = [sys.executable, str(TRAINER), "--path_to_root", str(learning_tree), "--work_dir", str(learned_work),
            "--evaluation_only", "--eval_lpips_pkg", "--backbone", "squeeze", "--img_size", "64", "--batch_size", "50",
            "--num_workers", "0"]
    empty_home = tmp_path_factory.mktemp("empty_torch_home")
    no_network = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    processes["evaluation_only"] = subprocess.Popen(argv, cwd=REPO_ROOT,
                                                    env=child_env(TORCH_HOME=str(empty_home), **no_network),
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {}
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        outputs[case] = (process.returncode, stdout, stderr)
    return outputs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_path(case, bad_cases, subprocess_runs, capsys):
    argv, named = bad_cases[case]
    if case in SUBPROCESS_CASES:
        returncode, _, stderr = subprocess_runs[case]
    else:
        from accelerate.state import AcceleratorState, GradientState

        import stage0_lpips_trainer
        from modules.cli import run_main

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        with pytest.raises(SystemExit) as exit_info:
            run_main(stage0_lpips_trainer.main, argv)
        returncode, stderr = exit_info.value.code, capsys.readouterr().err
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr[-2000:]  # on a line of its own
    assert str(named) in errors[0] and BAD_INPUTS[case] in errors[0], errors[0]


def test_evaluation_only_reproduces_the_table_and_says_the_package_is_unavailable(subprocess_runs, learned):
    _, results = learned
    returncode, stdout, stderr = subprocess_runs["evaluation_only"]
    assert returncode == 0, stderr[-2000:]
    unavailable = [line for line in stderr.splitlines() if "not available" in line]
    assert len(unavailable) == 1 and "lpips package's pretrained squeeze trunk" in unavailable[0], stderr[-2000:]
    rows = table_rows(stdout)
    assert rows["category"] == ["ours", "l2"]
    for category in VAL_CATEGORIES:  # the exported file scores exactly as the metric did in training
        assert rows[category] == [round(results[category]["ours"], 4), round(results[category]["l2"], 4)]
