"""``dirl convert SOURCE --out DIR [key=value ...]``: a Hugging Face Qwen3 (autoregressive)
directory -> a block-diffusion starting checkpoint (:mod:`dirl.model.sdar.convert`)."""

from __future__ import annotations

import sys

from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    parser.add_argument("source", help="a Hugging Face Qwen3 checkpoint directory")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="checkpoint directory to write (new or empty; "
                        "overwrite=true replaces it; never the source)")


def run(args) -> int:
    from dirl.model.checkpoint import CheckpointError
    from dirl.model.sdar.convert import ConvertConfig, convert_checkpoint
    from dirl.ownership import check_output, pop_overwrite

    overrides, overwrite = pop_overwrite(args.overrides)
    cfg = config_lib.load(ConvertConfig, args.config, overrides)
    out = check_output(args.out, inputs=[args.source], overwrite=overwrite)
    try:
        out = convert_checkpoint(args.source, out, cfg)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"dirl convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
