"""``dirl rl --config configs/tiny-rl.yaml model=DIR [key=value ...] [--resume DIR]``.

``--resume`` continues a run with its own saved ``config.yaml``; a ``--config``
file and overrides given with it are applied on top and listed.
"""

from __future__ import annotations

from dirl.commands import add_config_arguments, resolve_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, help="checkpoint dir, or a run dir (continues from its latest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from dirl.train import dist
    from dirl.train.rl.config import RLConfig
    from dirl.train.trainers import DiPOTrainer

    # stop_at_step belongs to the invocation that stopped, not to the one that continues.
    cfg, checkpoint = resolve_run_config(RLConfig, args, "rl", reset={"stop_at_step": 0})
    if args.no_progress:
        cfg.progress = False
    run_dir = DiPOTrainer(args=cfg).train(resume_from_checkpoint=checkpoint)
    if dist.is_main():
        print(f"rl: done, run directory {run_dir}")
    return 0
