"""``dirl sft --config X.yaml [key=value ...] [--resume DIR]``: blockwise-NELBO SFT.

``--resume`` takes a checkpoint directory or a run directory (its newest
checkpoint). Without ``--config`` the resumed run's own ``config.yaml`` is the
base, so ``dirl sft --resume runs/x`` just continues. Bad data, a bad config or
an unusable checkpoint print one error line and exit with 2 (no traceback).
"""

from __future__ import annotations

import sys

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from a checkpoint dir or a run dir (its latest checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per log step)")


def resolve_config(args):
    from dirl.train.sft import SFTConfig
    from dirl.train.state import CONFIG_FILE, resolve_resume

    base = args.config
    if base is None and args.resume is not None:
        saved = resolve_resume(args.resume) / CONFIG_FILE
        base = saved if saved.exists() else None
    from_checkpoint = args.config is None and base is not None
    # stop_at_step belongs to the invocation that stopped, not to the one that continues.
    overrides = (["stop_at_step=0"] if from_checkpoint else []) + list(args.overrides)
    cfg = config_lib.load(SFTConfig, base, overrides)
    if args.no_progress:
        cfg.progress = False
    return cfg


def run(args) -> int:
    from dirl.data import DataError
    from dirl.model.checkpoint import CheckpointError
    from dirl.train.sft import train_sft

    try:
        cfg = resolve_config(args)
        run_dir = train_sft(cfg, resume=args.resume)
    except (DataError, CheckpointError, FileNotFoundError) as err:
        print(f"dirl sft: error: {err}", file=sys.stderr)
        return 2
    from dirl.train import dist

    if dist.is_main():
        print(f"run directory: {run_dir}")
    return 0
