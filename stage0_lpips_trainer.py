"""Stage 0: train our own LPIPS perceptual metric on BAPPS (2AFC) and evaluate it.

The trunk (VGG16, AlexNet or SqueezeNet) is tapped at the LPIPS layers; 1x1 linear heads weigh
the unit-normalised feature differences (Zhang et al., "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", CVPR 2018). A small ranking head maps the two distances
(ref<->p0, ref<->p1) to the probability that humans preferred p1, trained with BCE against the
human judgement. Adam (betas 0.5/0.999), ``--num_epochs`` at ``--initial_lr`` then
``--decay_epochs`` of linear decay to 0; the head weights are clamped to >= 0 after every step.

Usage (the tutorial's command):

    accelerate launch stage0_lpips_trainer.py --path_to_root <BAPPS> --work_dir <WORK> \\
      --checkpoint_name "lpips_64x64_vgg.pt" --img_size 64 --batch_size 25 --num_workers 32 \\
      --num_epochs 10 --decay_epochs 5 --logging_steps 250 --pretrained_backbone --use_dropout \\
      --img_range minus_one_to_one --middle_channels 32 --eval_lpips_pkg --mixed_precision

Reads ``<BAPPS>/2afc/{train,val}/<category>/{ref,p0,p1,judge}`` (and ``jnd/val`` when present).
Writes ``<WORK>/<experiment_name>/checkpoint_<step>/`` (resumable), ``metrics.jsonl``,
``loss_curve.png``, ``eval_results.json``, and the final metric as ``<WORK>/<checkpoint_name>``
(torch) plus ``<WORK>/<stem>.safetensors`` (what stage 1's ``lpips_checkpoint`` loads).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from modules.accelerator import HALF_PRECISION, MIXED_PRECISION_CHOICES, build_accelerator, seed_per_process
from modules.bapps import JNDDataset, TwoAFCDataset, available_categories
from modules.checkpoints import CheckpointManager, write_resolved_config
from modules.cli import add_common_training_args, positive_int, run_main
from modules.data_loading import EpochSeeded, build_dataloader
from modules.errors import OneLineArgumentParser, UserError
from modules.export import describe_run
from modules.loop import Backward, LoopConfig, Update, train_loop
from modules.lpips import (
    LPIPS,
    RankingHead,
    jnd_average_precision,
    load_lpips_export,
    ranking_loss,
    save_lpips_export,
    two_afc_score,
)
from modules.metrics import MetricsLogger, device_peak_tflops, progress_bar
from modules.paths import check_writable_folder
from modules.performance import compile_modules
from modules.optim import build_adam, build_lr_scheduler

logger = logging.getLogger("ldm")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--path_to_root", required=True, help="BAPPS folder holding 2afc/ (and optionally jnd/)")
    data.add_argument("--img_size", type=positive_int, default=64, help="images are resized to this side")
    data.add_argument("--img_range", choices=("minus_one_to_one", "zero_to_one"), default="minus_one_to_one",
                      help="pixel range the loader produces (the metric always sees [-1, 1])")
    data.add_argument("--num_workers", type=int, default=4, help="data-loader worker processes per GPU")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=("vgg", "alex", "squeeze"), default="vgg")
    model.add_argument("--pretrained_backbone", action=argparse.BooleanOptionalAction, default=False,
                       help="start the trunk from torchvision's ImageNet weights (cache or download)")
    model.add_argument("--train_backbone", action="store_true",
                       help="also train the trunk ('tune'; with --no-pretrained_backbone: 'scratch')")
    model.add_argument("--use_dropout", action=argparse.BooleanOptionalAction, default=False,
                       help="dropout before the linear heads")
    model.add_argument("--middle_channels", type=positive_int, default=32, help="width of the ranking head")
    model.add_argument("--init_from_lpips_pkg", action="store_true",
                       help="start the linear heads from the lpips package's shipped v0.1 weights")
    train = parser.add_argument_group("training")
    train.add_argument("--work_dir", required=True, help="where checkpoints and the final metric go")
    train.add_argument("--experiment_name", default="LPIPSTrainer", help="run folder inside --work_dir")
    train.add_argument("--checkpoint_name", default="lpips.pt", help="file name of the final metric in --work_dir")
    train.add_argument("--checkpoints_total_limit", type=int, default=3,
                       help="keep the newest N epoch checkpoints, delete older ones (0: keep all)")
    train.add_argument("--batch_size", type=positive_int, default=50, help="triplets per process per step")
    train.add_argument("--eval_batch_size", type=positive_int, default=None, help="default: --batch_size")
    train.add_argument("--num_epochs", type=int, default=5, help="epochs at the initial learning rate")
    train.add_argument("--decay_epochs", type=int, default=5, help="epochs of linear decay to 0 afterwards")
    train.add_argument("--initial_lr", type=float, default=1e-4)
    train.add_argument("--logging_steps", type=positive_int, default=100, help="log gathered means every N steps")
    train.add_argument("--mixed_precision", nargs="?", const=HALF_PRECISION, default="auto",
                       metavar="{no,fp16,bf16,auto}",
                       help="autocast (default auto: bf16 on GPUs that have it, fp16 on older GPUs, none on a CPU); "
                            "the bare flag (the tutorial's) asks for the device's 16-bit type: bf16, fp16 on GPUs without bf16, "
                            "float32 on a CPU without bf16 kernels (no AVX512: bf16 there is many times slower)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the metric (needs a C++ compiler on a CPU, Triton on a GPU)")
    train.add_argument("--max_consecutive_nonfinite", type=positive_int, default=10, metavar="N",
                       help="a step with a non-finite loss or gradient is skipped and counted; N in a row stop the run")
    train.add_argument("--peak_tflops", type=float, default=None,
                       help="one device's peak TFLOP/s for the logged MFU (default: the GPU's known bf16 peak)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--evaluation_only", action="store_true",
                            help="evaluate <work_dir>/<checkpoint_name> and stop (no training)")
    evaluation.add_argument("--eval_lpips_pkg", action="store_true",
                            help="also evaluate the lpips package's pretrained metric, side by side")
    add_common_training_args(parser, with_overrides=False)
    args = parser.parse_args(argv)
    if args.num_epochs < 0 or args.decay_epochs < 0 or args.num_epochs + args.decay_epochs < 1:
        parser.error("--num_epochs and --decay_epochs must be >= 0 and add up to at least 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"argument --peak_tflops: must be > 0, got {args.peak_tflops}")
    if args.initial_lr <= 0:
        parser.error(f"--initial_lr must be > 0, got {args.initial_lr}")
    if args.mixed_precision not in MIXED_PRECISION_CHOICES + (HALF_PRECISION,):
        parser.error(f"argument --mixed_precision: invalid choice: {args.mixed_precision!r} "
                     f"(choose from {', '.join(MIXED_PRECISION_CHOICES)})")
    if args.checkpoints_total_limit < 0:
        parser.error(f"--checkpoints_total_limit must be >= 0 (0 keeps all), got {args.checkpoints_total_limit}")
    return args


def to_minus_one_one(x: torch.Tensor, img_range: str) -> torch.Tensor:
    """The metric takes [-1, 1]; a zero_to_one loader's images are mapped there."""
    return x * 2.0 - 1.0 if img_range == "zero_to_one" else x


def loader_workers(requested: int, num_items: int, batch_size: int, num_processes: int, drop_last: bool) -> int:
    """Worker processes for one loader: ``--num_workers``, but never more than the batches each
    process loads (a worker loads whole batches, so extra ones would only be forked and idle;
    a small val category with --num_workers 32 would otherwise start 32 processes)."""
    batches = num_items // batch_size if drop_last else math.ceil(num_items / batch_size)
    return max(0, min(requested, math.ceil(batches / num_processes)))


class TwoAFCObjective(torch.nn.Module):
    """The metric and its ranking head as one module: one forward gives both distances and the
    BCE ranking loss. Under DDP the whole objective is the wrapped module, so the gradients of the
    ranking head are synchronised too (calling the unwrapped head would leave each process with
    its own head).

    forward(ref, p0, p1, judge): images (B, 3, H, W) in [-1, 1], judge (B,) -> (loss, logs).
    """

    def __init__(self, metric: LPIPS, head: RankingHead) -> None:
        super().__init__()
        self.metric = metric
        self.head = head

    def forward(self, ref: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor,
                judge: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        d0, d1 = self.metric.triplet_distances(ref, p0, p1)  # (B,) each, under the caller's autocast
        with torch.autocast(device_type=ref.device.type, enabled=False):  # the head runs in float32
            return ranking_loss(self.head, d0.float(), d1.float(), judge)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(accelerator, metrics: Dict[str, torch.nn.Module], args) -> Dict[str, Dict[str, float]]:
    """2AFC score per val category (and JND mAP) for each named metric; gathered over processes.

    ``metrics`` maps a column name to a callable (x0, x1) -> (B,) distance on [-1, 1] images.
    Returns {category: {metric name: score}}.
    """
    root = Path(args.path_to_root)
    batch_size = args.eval_batch_size or args.batch_size
    results: Dict[str, Dict[str, float]] = {}
    for category in available_categories(root, "2afc", "val"):
        dataset = TwoAFCDataset(root, "val", categories=[category], img_size=args.img_size, img_range=args.img_range)
        workers = loader_workers(args.num_workers, len(dataset), batch_size, accelerator.num_processes, False)
        loader = accelerator.prepare(build_dataloader(dataset, batch_size, shuffle=False, num_workers=workers,
                                                      drop_last=False, seed=args.seed))
        scores: Dict[str, List[torch.Tensor]] = {name: [] for name in metrics}
        for batch in progress_bar(accelerator, len(loader), desc=f"eval 2afc/{category}", iterable=loader):
            ref, p0, p1 = (to_minus_one_one(batch[k], args.img_range) for k in ("ref", "p0", "p1"))
            for name, metric in metrics.items():
                with accelerator.autocast():
                    d0, d1 = metric(ref, p0).float(), metric(ref, p1).float()
                score = two_afc_score(d0, d1, batch["judge"].float())
                scores[name].append(accelerator.gather_for_metrics(score))
        results[category] = {name: torch.cat(values).mean().item() for name, values in scores.items()}

    for category in available_categories(root, "jnd", "val"):
        dataset = JNDDataset(root, "val", categories=[category], img_size=args.img_size, img_range=args.img_range)
        workers = loader_workers(args.num_workers, len(dataset), batch_size, accelerator.num_processes, False)
        loader = accelerator.prepare(build_dataloader(dataset, batch_size, shuffle=False, num_workers=workers,
                                                      drop_last=False, seed=args.seed))
        distances: Dict[str, List[torch.Tensor]] = {name: [] for name in metrics}
        same: List[torch.Tensor] = []
        for batch in progress_bar(accelerator, len(loader), desc=f"eval jnd/{category}", iterable=loader):
            p0, p1 = (to_minus_one_one(batch[k], args.img_range) for k in ("p0", "p1"))
            for name, metric in metrics.items():
                with accelerator.autocast():
                    distances[name].append(accelerator.gather_for_metrics(metric(p0, p1).float().flatten()))
            same.append(accelerator.gather_for_metrics(batch["same"].float().flatten()))
        same_all = torch.cat(same)
        results[f"jnd/{category}"] = {name: jnd_average_precision(torch.cat(d), same_all) for name, d in distances.items()}
    return results


# (row label, metrics.jsonl key) of the two mean rows, and which categories each averages.
_MEAN_ROWS = (("2afc mean", "2afc_mean", False), ("jnd mAP mean", "jnd_map_mean", True))


def result_means(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Mean over categories per metric, e.g. {"2afc_mean/ours": 0.71, "jnd_map_mean/l2": 0.6}."""
    means: Dict[str, float] = {}
    for _, key, is_jnd in _MEAN_ROWS:
        group = [row for category, row in results.items() if category.startswith("jnd/") == is_jnd]
        for name in (group[0] if group else {}):
            means[f"{key}/{name}"] = sum(row[name] for row in group) / len(group)
    return means


def format_results(results: Dict[str, Dict[str, float]]) -> str:
    """A table: one row per category (2AFC score, or JND mAP), one column per metric, and means."""
    if not results:
        return "no evaluation data found"
    names = list(next(iter(results.values())))
    width = max(12, *(len(c) for c in results))
    means = result_means(results)
    lines = [f"{'category':<{width}} " + " ".join(f"{n:>12}" for n in names)]
    for label, key, is_jnd in _MEAN_ROWS:
        group = {c: row for c, row in results.items() if c.startswith("jnd/") == is_jnd}
        for category, row in group.items():
            lines.append(f"{category:<{width}} " + " ".join(f"{row[n]:>12.4f}" for n in names))
        if group:
            lines.append(f"{label:<{width}} " + " ".join(f"{means[f'{key}/{n}']:>12.4f}" for n in names))
    return "\n".join(lines)


def l2_distance(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The plain pixel baseline: mean squared difference per image, (B,)."""
    return (x0.float() - x1.float()).square().mean(dim=(1, 2, 3))


def lpips_package_metric(backbone: str, device: torch.device) -> Optional[torch.nn.Module]:
    """The lpips package's pretrained metric, or None (with one line saying why) when unavailable."""
    try:
        import lpips  # noqa: F401  (a dev/peer dependency)
    except ImportError:
        logger.warning("--eval_lpips_pkg: the lpips package is not installed (pip install lpips); skipping its column")
        return None
    try:
        with warnings.catch_warnings():  # the package calls torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            package_metric = lpips.LPIPS(net=backbone, pretrained=True, verbose=False)
    except Exception as err:  # no cached torchvision trunk and no network, typically
        logger.warning("--eval_lpips_pkg: the lpips package's pretrained %s trunk is not available (%s); skipping its column",
                       backbone, str(err).splitlines()[0][:160])
        return None
    return package_metric.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def evaluation_columns(metric, args, device: torch.device) -> Dict[str, torch.nn.Module]:
    """The metrics the evaluation table compares: ours, L2, and (--eval_lpips_pkg) the package's."""
    columns = {"ours": metric, "l2": l2_distance}
    if args.eval_lpips_pkg:
        package_metric = lpips_package_metric(args.backbone, device)
        if package_metric is not None:
            columns["lpips_pkg"] = package_metric
    return columns


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    args.seed = 0 if args.seed is None else args.seed
    work_dir = Path(args.work_dir)
    run_dir = work_dir / args.experiment_name
    final_path = work_dir / args.checkpoint_name
    if not args.evaluation_only:  # now, not at the end of the first epoch
        check_writable_folder(work_dir, "--work_dir")
        check_writable_folder(run_dir, "--experiment_name")

    # -- accelerator ------------------------------------------------------------------
    accelerator = build_accelerator(args.mixed_precision, 1, args.seed, bool(args.log_wandb), run_dir)
    args.mixed_precision = accelerator.mixed_precision  # what ran (the bare flag's "half" resolved), for config.yaml

    # -- data (validated before any model is built: bad trees fail fast) ----------------
    root = Path(args.path_to_root)
    if args.evaluation_only:
        TwoAFCDataset(root, "val", img_size=args.img_size, img_range=args.img_range)  # validates the tree
        metric, _ = load_lpips_export(final_path)
        results = evaluate(accelerator, evaluation_columns(metric.to(accelerator.device).eval(), args,
                                                          accelerator.device), args)
        if accelerator.is_main_process:
            print(format_results(results))
        return results
    train_set = EpochSeeded(TwoAFCDataset(root, "train", img_size=args.img_size, img_range=args.img_range), args.seed)

    # -- models and optimizer -------------------------------------------------------------
    metric = LPIPS(backbone=args.backbone, pretrained_backbone=args.pretrained_backbone, use_dropout=args.use_dropout,
                   train_backbone=args.train_backbone)
    if args.init_from_lpips_pkg:
        metric.load_lpips_package_linear_weights()
    head = RankingHead(middle_channels=args.middle_channels)
    if args.compile:
        compile_modules([metric], accelerator.device)
    objective = TwoAFCObjective(metric, head)
    parameters = list(metric.trainable_parameters()) + list(head.parameters())
    optimizer = build_adam(parameters, lr=args.initial_lr, betas=(0.5, 0.999))
    workers = loader_workers(args.num_workers, len(train_set), args.batch_size, accelerator.num_processes, True)
    loader = build_dataloader(train_set, args.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                              seed=args.seed)

    # -- prepare ----------------------------------------------------------------------------
    objective, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    metric, head = accelerator.unwrap_model(objective).metric, accelerator.unwrap_model(objective).head
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"{root}/2afc/train: {len(train_set)} triplets give no full batch of --batch_size "
                        f"{args.batch_size} on {accelerator.num_processes} process(es); lower --batch_size")
    total_epochs = args.num_epochs + args.decay_epochs
    total_steps = total_epochs * steps_per_epoch
    # Full LR for num_epochs, then linear decay to 0 over decay_epochs (the paper's schedule).
    scheduler = build_lr_scheduler(optimizer, "linear", warmup_steps=0, total_steps=total_steps,
                                   hold_steps=args.num_epochs * steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)

    # -- resume -------------------------------------------------------------------------
    checkpoints = CheckpointManager(accelerator, run_dir, total_limit=args.checkpoints_total_limit or None)
    checkpoints.check_shared_filesystem()
    if args.resume_from_checkpoint is None:
        checkpoints.check_fresh_start()
    seed_per_process(accelerator, args.seed)  # before resume: a checkpoint's saved RNG states then win
    state = checkpoints.resume(args.resume_from_checkpoint)
    run_config = dict(vars(args))
    write_resolved_config(accelerator, run_dir, run_config)
    metrics_log = MetricsLogger(accelerator, run_dir, bool(args.log_wandb), args.experiment_name, None, run_config,
                                resumed=state.step > 0)
    metrics_log.truncate_after(state.step)

    # -- step function ----------------------------------------------------------------------
    # The head weights stay >= 0 (LPIPS's clamp), on the plain module: DDP shares its parameters.
    update = Update("", optimizer, parameters, scheduler, after_step=metric.clamp_linear_weights_)

    def train_step(batch, step: int):
        ref, p0, p1 = (to_minus_one_one(batch[k], args.img_range) for k in ("ref", "p0", "p1"))
        with accelerator.autocast():
            loss, logs = objective(ref, p0, p1, batch["judge"])
        yield Backward(update, loss, logs)

    # -- evaluate and export ----------------------------------------------------------------
    results: Dict[str, Dict[str, float]] = {}

    def export(state) -> None:
        metric.eval()
        results.update(evaluate(accelerator, evaluation_columns(metric, args, accelerator.device), args))
        metrics_log.log(result_means(results), state.step)
        if accelerator.is_main_process:
            print(format_results(results))
            (run_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
            save_lpips_export(metric, final_path, ranking_head=head,
                              metadata={"producer": describe_run("stage0_lpips_trainer.py", argv), "step": state.step,
                                        "eval": results})
            logger.info("wrote %s and %s", final_path, final_path.with_suffix(".safetensors"))

    # -- loop: a checkpoint at every epoch's end --------------------------------------------
    logger.info("training %s LPIPS on %d triplets: %d epochs x %d steps, %d process(es)", args.backbone,
                len(train_set), total_epochs, steps_per_epoch, accelerator.num_processes)
    peak = args.peak_tflops if args.peak_tflops is not None else device_peak_tflops(accelerator.device)
    config = LoopConfig(peak_tflops=peak, checkpoint_every_minutes=args.checkpoint_every_minutes,
                        stop_check_steps=args.stop_check_steps, max_consecutive_nonfinite=args.max_consecutive_nonfinite,
                        total_steps=total_steps, logging_steps=args.logging_steps, checkpoint_every=steps_per_epoch,
                        images_per_step=args.batch_size * accelerator.num_processes, per_gpu_batch_size=args.batch_size,
                        stop_after_steps=args.stop_after_steps, desc="stage0", plot_keys=("loss", "accuracy", "lr"))
    train_loop(accelerator, loader=loader, models=[objective], step_fn=train_step, state=state, config=config,
               checkpoints=checkpoints, metrics_log=metrics_log, export=export)
    return results


if __name__ == "__main__":
    run_main(main)
