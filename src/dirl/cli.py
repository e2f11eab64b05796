"""The ``dirl`` command line: ``dirl <command> [--config X.yaml] [key=value ...]``.

Each command lives in its own module and is imported only when called, so
``dirl --help`` is instant. Works unchanged under ``torchrun -m dirl.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

MAX_MESSAGE_CHARS = 2000  # the one error line, whatever a message held

# name -> (module, help). A module provides ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("dirl.commands.init", "write a randomly initialised checkpoint directory"),
    "convert": ("dirl.commands.convert", "turn a Hugging Face Qwen3 (AR) directory into a block-diffusion checkpoint"),
    "merge": ("dirl.commands.merge", "merge LoRA adapters into their base: a full checkpoint directory"),
    "show-config": ("dirl.commands.show_config", "print a resolved config (defaults <- YAML <- overrides)"),
    "generate": ("dirl.commands.generate", "decode a prompt with the rollout engine"),
    "sft": ("dirl.commands.sft", "supervised fine-tuning with the blockwise NELBO"),
    "rl": ("dirl.commands.rl", "DiPO reinforcement learning (and the other estimators)"),
    "eval": ("dirl.commands.eval", "evaluate a checkpoint on a benchmark file"),
    "serve": ("dirl.commands.serve", "OpenAI-compatible server with live weight updates"),
    "plan": ("dirl.commands.plan", "the per-rank memory plan of an SFT / RL config: does it fit the GPUs?"),
    "demo": ("dirl.commands.demo", "the embedded demo: SFT then DiPO on CPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dirl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (bad config, data, checkpoint)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a user error too")
        if "--help" in sys.argv or "-h" in sys.argv or name in _command_word(sys.argv[1:]):
            # Only import the command's module when its arguments are needed.
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
    return parser


def _command_word(argv: list[str]) -> list[str]:
    """The command name (the first word that is not a global option), as a 0/1-item list."""
    words = [a for a in argv if a != "--debug"]
    return words[:1]


def _parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    # argparse cannot split one nargs="*" positional around options (`key=v --json key2=v`):
    # stray key=value words after an option are overrides too.
    args, extra = parser.parse_known_args(sys.argv[1:])
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. The one error path: a :class:`~dirl.errors.UserError` (config, data,
    checkpoint) prints ``dirl <command>: <message>`` and returns 2; ``--debug`` re-raises it."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = _parse(parser)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from dirl.errors import UserError

    try:
        return importlib.import_module(args._module).run(args) or 0
    except ModuleNotFoundError as err:
        if err.name == args._module:
            print(f"dirl {args.command}: not available in this version", file=sys.stderr)
            return 2
        raise
    except UserError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 3] + "..."
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
            print(f"dirl {args.command}: {message}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``dirl`` executable (and ``python -m dirl.cli``): :func:`main`, then exit with its code.

    A worker launched by torchrun (``WORLD_SIZE`` > 1) leaves without interpreter finalization
    (``os._exit`` after flushing). By then the trainer has torn its process group down cleanly
    (``dist.teardown``), but torch internals still hold references to the backend, so its C++
    object would be destroyed only during finalization, where a gloo worker thread can abort the
    process ("terminate called without an active exception": the flaky exit of rank 1).
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
