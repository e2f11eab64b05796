"""``dirl plan --config X.yaml [--gpus N --gpu-gb G] [key=value ...]``: the per-rank memory plan
of an SFT or RL config (:mod:`dirl.memory_plan`) and whether it fits.

The model's shape comes from the config's ``model``: a checkpoint directory (its
``config.json`` is enough; no weights are read) or ``init:<preset>``. Exit status: 0 when the
plan fits ``MARGIN`` of ``--gpu-gb`` in every phase, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path

from dirl import config as config_lib
from dirl.commands import add_config_arguments
from dirl.errors import UserError
from dirl.memory_plan import MARGIN, plan, rl_workload, sft_workload

TERMS = ("masters", "grads", "adam", "step_temp", "cast_cache", "tied_grad", "reference", "decode_weights", "gathered",
         "activations", "head", "kv_cache")


def add_arguments(parser) -> None:
    parser.add_argument("--kind", choices=("sft", "rl"), default=None,
                        help="which trainer's config; default: guessed from the file name (x-rl.yaml -> rl)")
    parser.add_argument("--gpus", type=int, default=1, help="ranks (torchrun --nproc-per-node); default 1")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one device in GB; default 80")
    add_config_arguments(parser)


def model_config(spec: str, lora=None):
    """``(family config, adapter parameter count)`` of a config's ``model`` without reading weights."""
    import torch

    from dirl.model.checkpoint import build_model, load_config
    from dirl.model.factory import InitConfig, build_tokenizer
    from dirl.model.families import get_family
    from dirl.model.loading import INIT_PREFIX, init_spec
    if spec.startswith(INIT_PREFIX):
        name, preset = init_spec(spec)
        family, tokenizer = get_family(name), build_tokenizer("char")
        if preset not in family.presets:
            raise UserError(f"model={spec}: unknown preset; choose from {sorted(family.presets)}")
        cfg = family.config_cls.for_init(family.presets[preset], vocab_size=tokenizer.vocab_size,
                                         mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, block_size=InitConfig().block_size,
                                         torch_dtype="float32")
    elif (Path(spec) / "config.json").is_file():
        cfg = load_config(spec)
    else:
        raise UserError(f"model={spec}: no config.json there; give model=<checkpoint dir> (its config.json "
                        "is enough) or model=init:<preset>")
    if lora is None or not lora.enabled:
        return cfg, 0
    from dirl.model.lora import family_targets
    with torch.device("meta"):
        model = build_model(cfg)
    import re

    from dirl.model.lora import ROUTED_EXPERT
    targets = family_targets(model, lora.target_modules)
    excluded = [p for p in (get_family(cfg.arch.family).lora_exclude,
                            "" if lora.experts else ROUTED_EXPERT.pattern) if p]  # as apply_lora excludes

    def adapted(name: str) -> bool:
        return any(name.endswith(t) for t in targets) and not any(re.fullmatch(p, name) for p in excluded)

    adapters = sum(lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and adapted(name))
    return cfg, adapters


def _guess_kind(path: str | None) -> str:
    stem = Path(path).stem if path else ""
    return "rl" if stem.endswith("-rl") or stem.startswith("rl-") or "-rl-" in stem else "sft"


def run(args) -> int:
    from dirl.train.rl.config import RLConfig
    from dirl.train.sft.config import SFTConfig
    kind = args.kind or _guess_kind(args.config)
    if args.gpus < 1 or args.gpu_gb <= 0:
        raise UserError("--gpus must be >= 1 and --gpu-gb > 0")
    cfg = config_lib.load(RLConfig if kind == "rl" else SFTConfig, args.config, args.overrides)
    model_cfg, adapters = model_config(cfg.model, cfg.lora)
    make = rl_workload if kind == "rl" else sft_workload
    block = {"block_size": model_cfg.arch.block_size} if kind == "rl" else {}  # RL's worst-case trace row
    work = make(cfg, args.gpus, lora_params=adapters, **block)
    result = plan(model_cfg, work)
    budget = args.gpu_gb * MARGIN
    print(f"# dirl plan: {kind} config {args.config or '(defaults)'}, model {cfg.model} "
          f"({model_cfg.sizes.parameters / 1e9:.2f}B params{f', LoRA {adapters / 1e6:.1f}M' if adapters else ''}), "
          f"{args.gpus} x {args.gpu_gb:g} GB, {work.precision}, per rank:")
    for term in TERMS:
        print(f"  {term:<15}{result[term]:9.2f} GB")
    peaks = [("train_peak", result["train_peak"])] + ([("rollout_peak", result["rollout_peak"])]
                                                      if work.decode_rows else [])
    for name, value in peaks:
        print(f"  {name:<15}{value:9.2f} GB  {'fits' if value <= budget else 'DOES NOT FIT'}")
    ok = all(value <= budget for _, value in peaks)
    print(f"{'fits' if ok else 'does not fit'}: budget {budget:.1f} GB per rank ({MARGIN:.0%} of {args.gpu_gb:g} GB)")
    return 0 if ok else 1
