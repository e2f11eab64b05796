"""``dirl init --config configs/tiny.yaml --out DIR``."""

from __future__ import annotations

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")


def run(args) -> int:
    from dirl.model.factory import InitConfig, init_checkpoint

    cfg = config_lib.load(InitConfig, args.config, args.overrides)
    out = init_checkpoint(cfg, args.out)
    print(f"wrote {out}")
    return 0
