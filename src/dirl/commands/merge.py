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
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never an input)")


def run(args) -> int:
    import torch

    from dirl.model.checkpoint import CheckpointError, save_pretrained
    from dirl.model.loading import load_model_spec
    from dirl.model.lora import inject, load_adapter_weights, merge_adapters, read_adapter_config, resolve_base
    from dirl.ownership import check_output

    check_output(args.out, inputs=[args.adapter_dir, args.base], overwrite=args.overwrite)  # before any reading
    try:
        peft_config = read_adapter_config(args.adapter_dir)
        base = args.base or peft_config.base_model_name_or_path
        if not base:
            raise ValueError(f"{args.adapter_dir}: adapter_config.json names no base; pass --base")
        if not args.base:
            base = resolve_base(args.adapter_dir, base)
        out = check_output(args.out, inputs=[base], overwrite=True)  # the base the adapters name
        model, tokenizer = load_model_spec(base)
        model = inject(model, peft_config)
        load_adapter_weights(model, args.adapter_dir)
        merged = merge_adapters(model)
        bad = next((name for name, t in merged.state_dict().items()
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise ValueError(f"{args.adapter_dir}: merging gives NaN or infinite values in {bad!r} "
                             "(NaN adapters?); nothing written")
        out = save_pretrained(merged, tokenizer, out, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"dirl merge: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
