"""``dirl init --config configs/tiny.yaml --out DIR``."""

from __future__ import annotations

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="checkpoint directory to write (new or empty; "
                        "overwrite=true replaces it)")


def run(args) -> int:
    from dirl.model.factory import InitConfig, init_checkpoint
    from dirl.ownership import check_output, pop_overwrite

    overrides, overwrite = pop_overwrite(args.overrides)
    cfg = config_lib.load(InitConfig, args.config, overrides)
    out = init_checkpoint(cfg, check_output(args.out, overwrite=overwrite))
    print(f"wrote {out}")
    return 0
