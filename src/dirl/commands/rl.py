"""``dirl rl --config configs/tiny-rl.yaml model=DIR [key=value ...] [--resume DIR]``."""

from __future__ import annotations

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, help="checkpoint dir, or a run dir (continues from its latest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from dirl.train.rl import RLConfig, train_rl

    cfg = config_lib.load(RLConfig, args.config, args.overrides)
    run_dir = train_rl(cfg, resume=args.resume, progress=not args.no_progress)
    from dirl.train import dist

    if dist.is_main():
        print(f"rl: done, run directory {run_dir}")
    return 0
