"""``dirl show-config [KIND] --config X.yaml key=value``: print the resolved config."""

from __future__ import annotations

import importlib
from pathlib import Path

from dirl import config as config_lib
from dirl.commands import add_config_arguments

# kind -> "module:ConfigClass"
CONFIG_KINDS = {
    "init": "dirl.model.factory:InitConfig",
    "sft": "dirl.train.sft.config:SFTConfig",
    "rl": "dirl.train.rl.config:RLConfig",
    "eval": "dirl.eval.config:EvalConfig",
    "demo": "dirl.demo:DemoConfig",
}


def add_arguments(parser) -> None:
    parser.add_argument("--kind", choices=sorted(CONFIG_KINDS), default=None,
                        help="which config; default: guessed from the file name (tiny-sft.yaml -> sft)")
    add_config_arguments(parser)


def config_class(kind: str):
    module, name = CONFIG_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def guess_kind(path: str | None) -> str:
    stem = Path(path).stem if path else ""
    for kind in CONFIG_KINDS:
        if stem.endswith(f"-{kind}") or stem.startswith(f"{kind}-") or stem == kind:
            return kind
    return "init"


def run(args) -> int:
    kind = args.kind or guess_kind(args.config)
    cfg = config_lib.load(config_class(kind), args.config, args.overrides)
    print(f"# {kind} config", end="\n")
    print(config_lib.dump(cfg), end="")
    return 0
