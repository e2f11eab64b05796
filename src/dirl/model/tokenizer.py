"""Tokenizers: Hugging Face ``tokenizer.json`` files for every checkpoint.

Real checkpoints (SDAR / Qwen vocab) and the built-in character tokenizer used by
the synthetic tasks are stored in the same format (``tokenizer.json`` +
``tokenizer_config.json`` with the chat template), so every checkpoint directory
is self-contained and loads through one code path. The char tokenizer is a
``tokenizers`` WordLevel model over single characters with the special tokens
as added tokens.

Saving is faithful: a tokenizer loaded from a directory and left unchanged (same vocabulary,
special tokens and chat template as loaded) is saved as that directory's tokenizer files,
byte for byte -- so it loads wherever the source loaded, e.g. transformers 4.52.4, the
version SDAR's code pins, which cannot read the ``tokenizer_config.json`` transformers 5
writes. A changed or built tokenizer (``dirl convert``'s added mask token, the char
tokenizer) is written by transformers' ``save_pretrained`` and its ``tokenizer_config.json``
made readable by transformers 4 and 5 alike (:func:`portable_tokenizer_config`).

The engine never sees text; this wrapper is used by train/eval/serve only.
"""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path

MASK_TOKEN = "<|MASK|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")  # ChatML / Qwen, Llama 3, Gemma
CHAR_SPECIALS = [EOS_TOKEN, "<|user|>", "<|assistant|>", MASK_TOKEN]
CHAR_ALPHABET = string.printable[:-5] + "\n"  # printable ASCII without \t\r\x0b\x0c, plus newline
# Compact chat template for the char tokenizer: a small model reads every character.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# The tokenizer files of a directory: an unchanged tokenizer is saved as exactly these files of its source.
SOURCE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                          "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer:
    """A thin wrapper over a transformers fast tokenizer with the ids dirl needs.

    ``source_files``: name -> bytes of the source directory's :data:`SOURCE_TOKENIZER_FILES`;
    :meth:`save` writes them as they are while the tokenizer is unchanged since then.
    """

    def __init__(self, hf_tokenizer, mask_token: str = MASK_TOKEN, source_files: dict[str, bytes] | None = None):
        self.hf = hf_tokenizer
        self.source_files = dict(source_files or {})
        self._loaded_state = _state(hf_tokenizer)
        mask_id = hf_tokenizer.convert_tokens_to_ids(mask_token)
        if mask_id is None or mask_id == hf_tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no mask token {mask_token!r} (an autoregressive checkpoint? "
                             "`dirl convert` makes a block-diffusion one)")
        self.mask_token_id: int = mask_id
        self.eos_token_id: int = hf_tokenizer.eos_token_id
        self.pad_token_id: int = (hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None
                                  else self.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with: ``<|im_end|>`` (Qwen /
        SDAR, ChatML) or another known end-of-turn token in the vocabulary; else EOS (the char
        tokenizer's template ends a turn with EOS)."""
        vocab = self.hf.get_vocab()  # added tokens included
        return next((vocab[token] for token in END_OF_TURN_TOKENS if token in vocab), self.eos_token_id)

    def stop_ids(self) -> list[int]:
        """Ids that end a completion: EOS and, for chat models, the end-of-turn token."""
        return sorted({self.eos_token_id, self.end_of_turn_id})

    def unchanged(self) -> bool:
        """Whether this tokenizer still is its source directory's (module docstring)."""
        return bool(self.source_files) and _state(self.hf) == self._loaded_state

    def save(self, directory: str | Path) -> None:
        """The source's files byte for byte while :meth:`unchanged`, else transformers' save in
        a format transformers 4 and 5 both read."""
        directory = Path(directory)
        if self.unchanged():
            for name, content in self.source_files.items():
                (directory / name).write_bytes(content)
            return
        self.hf.save_pretrained(str(directory))
        config = directory / TOKENIZER_CONFIG
        if config.exists():
            config.write_text(json.dumps(portable_tokenizer_config(json.loads(config.read_text())), indent=2) + "\n")


def _state(hf_tokenizer) -> tuple:
    """What a change to a tokenizer would change: its vocabulary (added tokens included), special
    tokens and chat template."""
    return (len(hf_tokenizer), tuple(sorted(hf_tokenizer.get_vocab().items())) if len(hf_tokenizer) < 1024 else
            tuple(sorted(hf_tokenizer.get_added_vocab().items())), repr(hf_tokenizer.special_tokens_map),
            getattr(hf_tokenizer, "chat_template", None))


def portable_tokenizer_config(config: dict) -> dict:
    """A ``tokenizer_config.json`` written by transformers 5 in the form transformers 4 reads too:
    the generic class is ``PreTrainedTokenizerFast`` (5.x's ``TokenizersBackend`` does not exist
    in 4.x) and a list of ``extra_special_tokens`` is 4.x's ``additional_special_tokens``."""
    out = dict(config)
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        out.pop("extra_special_tokens")
        out.setdefault("additional_special_tokens", extra)
    return out


def char_tokenizer() -> Tokenizer:
    """The built-in character tokenizer (about 100 ids)."""
    from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    for ch in CHAR_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    raw.normalizer = _char_normalizer()
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                 mask_token=MASK_TOKEN, additional_special_tokens=CHAR_SPECIALS[1:3])
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return Tokenizer(hf)


# Characters outside the alphabet that have a plain ASCII stand-in (GSM8K holds ’; answers ×).
CHAR_STAND_INS = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
                  "\u2212": "-", "\u00d7": "*", "\u00f7": "/", "\u2026": "...", "\t": " ", "\r": ""}


def _char_normalizer():
    """Accents stripped (é -> e), common punctuation to its ASCII stand-in, and any other
    character outside the alphabet to ``?``: the unknown token is end-of-text, and a character
    the alphabet lacks must not end a prompt in the middle."""
    import re

    from tokenizers import Regex, normalizers

    outside = "[^" + "".join(re.escape(ch) for ch in CHAR_ALPHABET) + "]"
    return normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(),
        *(normalizers.Replace(old, new) for old, new in CHAR_STAND_INS.items()),
        normalizers.Replace(Regex(outside), "?")])


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load from a checkpoint directory: ``tokenizer.json`` or Qwen's vocab.json + merges.txt."""
    directory = Path(directory)
    kept = {name: (directory / name).read_bytes() for name in SOURCE_TOKENIZER_FILES if (directory / name).exists()}
    return Tokenizer(load_hf_tokenizer(directory), source_files=kept)


def load_hf_tokenizer(directory: str | Path):
    """The transformers fast tokenizer of a directory, chat template included (no mask needed)."""
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        hf = PreTrainedTokenizerFast.from_pretrained(str(directory))
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        # Real SDAR directories name remote tokenizer code in auto_map; the built-in
        # Qwen2 class reads the same files, so no trust_remote_code is needed.
        hf = Qwen2TokenizerFast.from_pretrained(str(directory))
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt) found")
    template_file = directory / "chat_template.jinja"
    if getattr(hf, "chat_template", None) is None and template_file.exists():
        hf.chat_template = template_file.read_text()
    return hf
