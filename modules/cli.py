"""What every script's command line shares: the run-control flags of the trainers, argparse
types, the one logger, and :func:`run_main`, which turns a :class:`UserError` into one line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from modules.errors import Interrupted, UserError

USER_ERROR_EXIT_CODE = 2


def setup_logging(is_main_process: bool = True) -> None:
    """One logger for the toolkit ("ldm"): INFO on the main process, warnings only elsewhere."""
    level = logging.INFO if is_main_process else logging.WARNING
    root = logging.getLogger("ldm")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_common_training_args(parser: argparse.ArgumentParser, with_overrides: bool = True) -> None:
    """Flags every trainer takes beyond the tutorial's own (DESIGN: 'Beyond the tutorial').

    ``with_overrides=False`` for a trainer configured by flags alone (stage 0), where ``--set``
    would have no YAML to override.
    """
    group = parser.add_argument_group("run control (all trainers)")
    group.add_argument("--resume_from_checkpoint", default=None, metavar="latest|DIR",
                       help="continue from the newest checkpoint of this run ('latest') or from a checkpoint folder")
    group.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, else 0)")
    group.add_argument("--log_wandb", action=argparse.BooleanOptionalAction, default=None,
                       help="log to Weights & Biases (works offline with WANDB_MODE=offline); "
                            "default: the config's log_wandb")
    if with_overrides:
        group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key, e.g. --set training_args.learning_rate=1e-4 (repeatable)")
    group.add_argument("--stop_after_steps", type=positive_int, default=None, metavar="N",
                       help="save a checkpoint and stop after N optimizer steps in this invocation "
                            "(for wall-time-limited jobs; continue with --resume_from_checkpoint latest)")
    group.add_argument("--checkpoint_every_minutes", type=positive_float, default=None, metavar="M",
                       help="also save a checkpoint when M minutes have passed since the last one (bounds what a "
                            "hard kill can lose; SIGTERM and SIGINT always save one before stopping)")
    group.add_argument("--stop_check_steps", type=positive_int, default=10, metavar="N",
                       help="with several processes, the ranks agree every N optimizer steps whether to stop "
                            "(a signal) or save (--checkpoint_every_minutes): one tiny all-reduce (default 10; "
                            "one process checks every step for free)")


def add_run_folder_args(parser: argparse.ArgumentParser, experiment_name: str, training_config: str,
                        model_config_help: str, gens_what: str) -> None:
    """The tutorial's flags of the YAML-configured trainers (stages 1 and 2): where the run goes,
    which configs and data it reads, where its image grids go."""
    parser.add_argument("--experiment_name", default=experiment_name,
                        help="run folder inside --working_directory (checkpoints, metrics) and the wandb project")
    parser.add_argument("--wandb_run_name", default=None, help="name of the wandb run (with --log_wandb)")
    parser.add_argument("--working_directory", required=True,
                        help="holds <experiment_name>/ (checkpoints, logs) and the exported model.safetensors")
    parser.add_argument("--training_config", default=training_config,
                        help="training YAML (training_args: ...; see the shipped file)")
    parser.add_argument("--model_config", default="configs/ldm.yaml", help=model_config_help)
    parser.add_argument("--dataset", required=True,
                        help="celebahq | ffhq | celeba (unconditional image folders), imagenet (class folders), "
                             "conceptual_captions (a prep_cc.py output) | shapes (built in; text)")
    parser.add_argument("--path_to_dataset", default=None,
                        help="the dataset's folder (optional only for shapes, which is then rendered on the fly)")
    parser.add_argument("--path_to_save_gens", default=None,
                        help=f"folder for the {gens_what} grids step_<N>.png "
                             "(default: a folder in <working_directory>/<experiment_name>/)")


def one_line(err: BaseException) -> str:
    """The user-facing line of an error.

    A UserError raised in a DataLoader worker comes back re-raised with the worker's traceback
    in its message ("Caught UserError in DataLoader worker ..."); the message is its last line.
    """
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        prefix = "modules.errors.UserError: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split("\n"))


# How long a rank other than 0 waits before it prints its own user error (see report_user_error).
OTHER_RANKS_ERROR_DELAY_S = 3.0


def report_user_error(line: str) -> None:
    """Print a user error's one line, once per run rather than once per process.

    Under ``accelerate launch`` with several processes every rank usually fails on the same input.
    Rank 0 prints at once; another rank waits a moment, in which torch's elastic agent, seeing rank
    0 fail, ends it, so the line appears once; a rank that is still alive after the wait failed on
    its own and prints. The line also goes to the agent's error file (``TORCHELASTIC_ERROR_FILE``),
    so the failure summary the launcher prints after it names our message instead of "To enable
    traceback see ...".
    """
    import json
    import os
    import time

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(OTHER_RANKS_ERROR_DELAY_S)
    print(line, file=sys.stderr, flush=True)


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit code 2;
    a run stopped by a signal after its checkpoint (:class:`Interrupted`, already said in the log)
    exits with 128 + the signal's number."""
    from modules.preemption import die_with_launcher

    die_with_launcher()
    try:
        main(argv)
    except Interrupted as stop:
        sys.exit(128 + stop.signum)
    except UserError as err:
        report_user_error(f"error: {one_line(err)}")
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
