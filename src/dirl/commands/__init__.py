"""One module per ``dirl`` subcommand: argument parsing and wiring only, no algorithms."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """``--config X.yaml`` and trailing ``key=value`` overrides, shared by every command."""
    parser.add_argument("--config", default=default_config, help="YAML recipe (keys as in the config dataclass)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")


def resolve_run_config(cls, args, command: str, reset: dict | None = None):
    """A trainer's config -> ``(cfg, resume_checkpoint or None)``.

    Fresh run: defaults <- ``--config`` <- overrides. ``--resume DIR``: the run's own saved
    ``config.yaml`` is the base, a ``--config`` file's keys and the overrides go on top (each
    change is listed on stderr), ``out`` is the run directory itself, and ``reset`` (fields that
    belong to the invocation that stopped, e.g. ``stop_at_step``) is applied to the base first.
    """
    import sys

    from dirl import config as config_lib

    if args.resume is None:
        return config_lib.load(cls, args.config, args.overrides), None
    from dirl.model.checkpoint import CheckpointError
    from dirl.train.state import CONFIG_FILE, resolve_resume

    checkpoint = resolve_resume(args.resume)
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.exists():
        raise CheckpointError(f"{checkpoint}: no {CONFIG_FILE}, so the run's config is unknown")
    saved = config_lib.load(cls, saved_file, [f"{k}={v}" for k, v in (reset or {}).items()])
    run_dir = checkpoint.parent.parent
    cfg, changes = config_lib.load_on_top(cls, saved, args.config, [*args.overrides, f"out={run_dir}"])
    changes = [c for c in changes if not c.startswith("out:")]
    print(f"dirl {command}: resuming {checkpoint} with the run's config"
          + (f"; changed: {'; '.join(changes)}" if changes else ""), file=sys.stderr)
    return cfg, checkpoint
