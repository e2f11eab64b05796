"""One module per ``dirl`` subcommand: argument parsing and wiring only, no algorithms."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """``--config X.yaml`` and trailing ``key=value`` overrides, shared by every command."""
    parser.add_argument("--config", default=default_config, help="YAML recipe (keys as in the config dataclass)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
