"""``dirl merge ADAPTER_DIR --out DIR [--base BASE]``: LoRA adapters folded into their base.

The base is ``--base`` or the adapter config's ``base_model_name_or_path`` (a
checkpoint directory relative to the adapter directory, or the ``init:<preset>``
spec a run started from). The
output is a full checkpoint written like any other save -- faithful to the base
directory (remote code, generation_config.json, fields, the base's dtype).
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("adapter_dir", help="a directory with adapter_config.json + adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--base", default=None, help="the base checkpoint (default: the adapter config's)")
    parser.add_argument("--dtype", default=None, help="dtype of the saved weights (default: the base's)")


def run(args) -> int:
    from dirl.model.checkpoint import CheckpointError, save_pretrained
    from dirl.model.loading import load_model_spec
    from dirl.model.lora import inject, load_adapter_weights, merge_adapters, read_adapter_config, resolve_base

    try:
        peft_config = read_adapter_config(args.adapter_dir)
        base = args.base or peft_config.base_model_name_or_path
        if not base:
            raise ValueError(f"{args.adapter_dir}: adapter_config.json names no base; pass --base")
        if not args.base:
            base = resolve_base(args.adapter_dir, base)
        model, tokenizer = load_model_spec(base)
        model = inject(model, peft_config)
        load_adapter_weights(model, args.adapter_dir)
        out = save_pretrained(merge_adapters(model), tokenizer, args.out, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"dirl merge: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
