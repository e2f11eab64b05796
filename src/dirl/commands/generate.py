"""``dirl generate --model DIR --prompt TEXT [--json] [--chat] [key=value ...]``.

Decodes one prompt with the rollout engine. The ``key=value`` overrides (and an
optional ``--config`` YAML) are :class:`~dirl.engine.engine.SamplingParams`
fields, type-checked by :mod:`dirl.config` (``max_new_tokens=32 temperature=0
unmasking=static steps_per_block=2 stop_ids=[0]``). Without ``stop_ids`` the
tokenizer's stop ids (EOS, ``<|im_end|>``) apply.

Prints the completion text, or with ``--json`` one JSON object: ``text``,
``token_ids`` (the completion), ``steps``, ``logps``, ``tokens_per_forward``
(committed tokens per model forward) and ``finish_reason``.
"""

from __future__ import annotations

import json
from pathlib import Path


from dirl import config as config_lib
from dirl.commands import add_config_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + weights + tokenizer)")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--no-cache", action="store_true", help="use the no-cache reference decoder")
    parser.add_argument("--compile", action="store_true",
                        help="compile the cached step (~50 s of compiling first: for long generations)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: float32)")
    add_config_arguments(parser)


def _stop_ids_given(config_path: str | None, overrides: list[str]) -> bool:
    """Whether the user set ``stop_ids`` (an explicit empty list means: no stop ids)."""
    if any(item.split("=", 1)[0].strip() == "stop_ids" for item in overrides):
        return True
    if config_path and Path(config_path).exists():
        data = config_lib.parse_yaml(Path(config_path).read_text(encoding="utf-8"), config_path) or {}
        return isinstance(data, dict) and "stop_ids" in data
    return False


def run(args) -> int:
    from dirl.engine.engine import Engine
    from dirl.model.checkpoint import CheckpointError, load_pretrained
    from dirl.rollout import SamplingParams, check_for_model
    from dirl.runtime import resolve_device

    params = config_lib.load(SamplingParams, args.config, args.overrides)
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=resolve_device(args.device))
    if tokenizer is None:
        raise CheckpointError(f"{args.model} has no tokenizer files")
    if not _stop_ids_given(args.config, args.overrides):
        params.stop_ids = tokenizer.stop_ids()
    try:
        check_for_model(params, model.arch)
    except ValueError as err:
        raise config_lib.ConfigError(str(err)) from None
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        raise config_lib.ConfigError("--prompt: the prompt is empty")
    context = model.arch.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > context:
        raise config_lib.ConfigError(f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                                     f"({params.max_new_tokens}) exceeds the model's context of {context} tokens")
    rollout = Engine(model.eval(), use_cache=not args.no_cache, compile=args.compile).generate([prompt_ids], params)[0]
    completion = tokenizer.decode(rollout.completion_ids)
    if args.json:
        n = rollout.num_tokens
        print(json.dumps({
            "text": completion,
            "token_ids": rollout.completion_ids,
            "steps": rollout.steps[:n],
            "logps": rollout.logps[:n],
            "tokens_per_forward": len(rollout.token_ids) / max(rollout.num_forwards, 1),
            "finish_reason": rollout.finish_reason,
        }))
    else:
        print(completion)
    return 0
