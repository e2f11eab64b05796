"""An autoregressive Qwen3 checkpoint -> a block-diffusion (SDAR) starting checkpoint.

SDAR itself was made this way (SDAR, Cheng et al. 2025, §3: continued training of
Qwen3 with the blockwise objective; dllm's "A2D" does the same): the Qwen3
decoder *is* the SDAR decoder, and only the attention pattern differs, so the
weights are kept unchanged and with ``block_size = 1`` the converted model is
the AR model (``tests/test_convert.py`` checks logits against transformers'
Qwen3ForCausalLM). What changes:

* ``model_type`` / ``architectures`` become SDAR's; ``block_size`` and
  ``mask_token_id`` are set. The source is read in either transformers format --
  4.x (``rope_theta``, ``torch_dtype``) or 5.x (``rope_parameters``, ``dtype``) --
  with Qwen3's own defaults for absent fields (``head_dim`` 128, ``rope_theta``
  10000: not SDAR's), and the output spells every SDAR field in SDAR's 4.x schema,
  the one SDAR's remote code (transformers 4.52) reads. Other fields are kept as read.
* ``remote_code=<SDAR dir>`` copies that directory's ``auto_map`` and code files, and
  the fields of its ``config.json`` the output lacks (``fuse_cross_entropy``,
  ``attn_implementation`` ...): the remote code reads them.
* A tokenizer without ``<|MASK|>`` gets it as a new special token. For Qwen3's
  tokenizer that is id 151669 -- SDAR's mask id -- and falls in the padding rows
  of the 151936-row embedding; a smaller embedding grows by the missing rows.
* The mask token's embedding and ``lm_head`` rows are set to the **mean of the
  rows of the existing tokens** (Hewitt 2021, "Initializing new word
  embeddings for pretrained language models"): a padding or random row has an
  arbitrary norm, and as an ``lm_head`` row it can give the new token a large
  logit and shift every prediction; the mean row gives a logit near the average
  (the AR distribution barely moves: KL bounded by the log of the vocabulary
  share) and, as an input, a neutral "no information" vector -- what a mask is.

The output is written by :func:`~dirl.model.checkpoint.save_pretrained`, so it
is faithful to the source (``generation_config.json``, fields, dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dirl.errors import POSITIVE, check_fields, one_of
from dirl.model.checkpoint import DTYPES, CheckpointError, build_model, companion_files, load_model, save_pretrained
from dirl.model.sdar.config import SDARConfig
from dirl.model.tokenizer import MASK_TOKEN, Tokenizer, load_hf_tokenizer

SUPPORTED_MODEL_TYPES = ("qwen3",)
SDAR_ARCHITECTURES = ["SDARForCausalLM"]  # a Qwen3 decoder is SDAR's: its config and weights read as SDAR's
# transformers' Qwen3Config defaults of the fields SDARConfig reads (4.x and 5.x agree; tests/test_convert.py
# checks them against the installed transformers): what an absent field means in a Qwen3 config.json.
QWEN3_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
                      attention_bias=False)
_V5_SPELLINGS = ("rope_parameters", "dtype")  # read into rope_theta / torch_dtype, not written back


@dataclass
class ConvertConfig:
    block_size: int = 4
    mask_token: str = MASK_TOKEN
    dtype: str | None = None         # of the saved weights; None = the source's torch_dtype
    remote_code: str | None = None   # an SDAR checkpoint dir whose auto_map + remote-code files to copy
    max_shard_mb: int = 2048

    def __post_init__(self) -> None:
        check_fields(self, {"block_size": POSITIVE, "max_shard_mb": POSITIVE,
                            "dtype": one_of(*DTYPES)})


def _source_config(directory: Path):
    """The AR model's config (mask id 0 until the tokenizer says), carrying its companion files."""
    path = directory / "config.json"
    data = _read_json(path)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} cannot be converted "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if data.get("use_sliding_window"):
        raise CheckpointError(f"{path}: use_sliding_window is not supported")
    try:
        cfg = SDARConfig.from_hf_dict(qwen3_fields(data))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err
    cfg.loaded = {}  # a new schema: every SDAR field is written on save
    cfg.companion_files = companion_files(directory, data)
    return cfg


def qwen3_fields(data: dict) -> dict:
    """A Qwen3 ``config.json`` (transformers 4.x or 5.x) as SDAR's 4.x-style dict: RoPE theta from
    ``rope_theta`` or ``rope_parameters``, the dtype from ``torch_dtype`` or ``dtype``, absent
    fields at Qwen3's defaults; ``mask_token_id`` 0 until the tokenizer gives it."""
    out = {k: v for k, v in data.items() if k not in _V5_SPELLINGS}
    rope = data.get("rope_parameters")
    if "rope_theta" not in data and isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
            raise ValueError(f"rope_parameters {rope!r} is not supported (plain RoPE with a rope_theta only)")
        out["rope_theta"] = rope["rope_theta"]
    if "torch_dtype" not in data and isinstance(data.get("dtype"), str):
        out["torch_dtype"] = data["dtype"]
    for name, value in QWEN3_DEFAULTS.items():
        if out.get(name) is None:
            out[name] = value
    out["rope_theta"] = float(out["rope_theta"])
    out.setdefault("mask_token_id", 0)
    return out


def mean_row_init(weight: torch.Tensor, num_existing: int, num_rows: int, new_ids: list[int]) -> torch.Tensor:
    """``weight`` (V, d) grown to ``num_rows`` rows, ``new_ids`` set to the mean of rows
    ``[0, num_existing)`` (the tokenizer's tokens before the new ones; the module docstring says why)."""
    grown = torch.zeros(num_rows, weight.shape[1], dtype=weight.dtype)  # (V', d)
    grown[: weight.shape[0]] = weight
    mean = weight[:num_existing].float().mean(dim=0)  # (d,) accumulated in fp32
    grown[new_ids] = mean.to(weight.dtype)
    return grown


def _with_vocab(model, num_existing: int, num_rows: int, new_ids: list[int]):
    """A model like ``model`` with ``num_rows`` vocabulary rows, new ids mean-initialised."""
    state = model.state_dict()
    grown_names = ["model.embed_tokens.weight"] + ([] if model.config.tie_word_embeddings else ["lm_head.weight"])
    for name in grown_names:
        state[name] = mean_row_init(state[name], num_existing, num_rows, new_ids)
    model.config.vocab_size = num_rows
    with torch.device("meta"):
        grown = build_model(model.config)
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    grown.load_state_dict(state, assign=True)
    grown.tie_weights()
    return grown


def _add_remote_code(model, remote_code: str) -> None:
    """Copy an SDAR checkpoint's ``auto_map`` and its remote-code files (for transformers)."""
    directory = Path(remote_code)
    data = _read_json(directory / "config.json")
    if not data.get("auto_map"):
        raise CheckpointError(f"{directory / 'config.json'}: remote_code names a directory without auto_map")
    files = {name: content for name, content in companion_files(directory, data).items() if name.endswith(".py")}
    if not files:
        raise CheckpointError(f"{directory}: none of the remote-code files named by auto_map is there")
    model.config.extra["auto_map"] = data["auto_map"]
    model.config.companion_files.update(files)
    ours = model.config.to_hf_dict()
    for name, value in data.items():  # the fields the remote code reads that a Qwen3 config lacks
        if name not in ours and name not in _V5_SPELLINGS:
            model.config.extra[name] = value


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: not found (is {path.parent} a Hugging Face checkpoint directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # incl. UnicodeDecodeError, JSONDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({' '.join(str(err).split())[:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def convert_checkpoint(source: str | Path, out: str | Path, cfg: ConvertConfig) -> Path:
    """Write the block-diffusion starting checkpoint of the Qwen3 directory ``source`` to ``out``."""
    source = Path(source)
    model_cfg = _source_config(source)
    # In the source's dtype (an 8B model in bf16 needs 16 GB, not 32).
    model = load_model(model_cfg, source, dtype=DTYPES.get(model_cfg.torch_dtype))
    hf_tokenizer = load_hf_tokenizer(source)
    num_existing = len(hf_tokenizer)
    mask_id = hf_tokenizer.convert_tokens_to_ids(cfg.mask_token)
    added = mask_id is None or mask_id == hf_tokenizer.unk_token_id
    if added:
        hf_tokenizer.add_special_tokens({"mask_token": cfg.mask_token})
        mask_id = hf_tokenizer.convert_tokens_to_ids(cfg.mask_token)
        model = _with_vocab(model, num_existing, max(model.config.vocab_size, len(hf_tokenizer)), [mask_id])
    # A tokenizer that gained a token must not carry the source's stale vocab files.
    tokenizer = Tokenizer(hf_tokenizer, mask_token=cfg.mask_token)
    model.config.block_size, model.config.mask_token_id = cfg.block_size, mask_id
    if model.config.eos_token_id is None:  # transformers writes null ids when none were given
        model.config.eos_token_id = tokenizer.eos_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.extra["architectures"] = SDAR_ARCHITECTURES
    model.config.__post_init__()  # validate block_size and the mask id against the vocabulary
    if cfg.remote_code:
        _add_remote_code(model, cfg.remote_code)
    return save_pretrained(model, tokenizer, out, max_shard_bytes=cfg.max_shard_mb << 20, dtype=cfg.dtype)
