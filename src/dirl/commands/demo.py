"""``dirl demo [--config configs/demo.yaml] [key=value ...]`` -- e.g. ``dirl demo estimator=trace_mc``."""

from __future__ import annotations

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    from dirl.demo import DemoConfig, run_demo

    cfg = config_lib.load(DemoConfig, args.config, args.overrides)
    run_demo(cfg)
    return 0
