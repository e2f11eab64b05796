"""``dirl sft --config X.yaml [key=value ...] [--resume DIR]``: blockwise-NELBO SFT.

``--resume`` takes a checkpoint directory or a run directory (its newest
checkpoint) and continues with the run's own saved ``config.yaml``; a
``--config`` file and overrides given with it are applied on top and listed.
Bad data, a bad config or an unusable checkpoint print one error line and exit
with 2 (no traceback).
"""

from __future__ import annotations

from dirl.commands import add_config_arguments, resolve_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue from a checkpoint dir or a run dir (its latest checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per log step)")


def resolve_config(args):
    from dirl.train.sft.config import SFTConfig

    # stop_at_step belongs to the invocation that stopped, not to the one that continues.
    cfg, checkpoint = resolve_run_config(SFTConfig, args, "sft", reset={"stop_at_step": 0})
    if args.no_progress:
        cfg.progress = False
    return cfg, checkpoint


def run(args) -> int:
    from dirl.train import dist
    from dirl.train.trainers import SFTTrainer

    cfg, checkpoint = resolve_config(args)
    run_dir = SFTTrainer(args=cfg).train(resume_from_checkpoint=checkpoint)
    if dist.is_main():
        print(f"run directory: {run_dir}")
    return 0
