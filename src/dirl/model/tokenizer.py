"""Tokenizers: Hugging Face ``tokenizer.json`` files for every checkpoint.

Real checkpoints (SDAR / Qwen vocab) and the built-in character tokenizer used by
the synthetic tasks are stored in the same format (``tokenizer.json`` +
``tokenizer_config.json`` with the chat template), so every checkpoint directory
is self-contained and loads through one code path. The char tokenizer is a
``tokenizers`` WordLevel model over single characters with the special tokens
as added tokens.

A tokenizer loaded from a directory keeps that directory's tokenizer files which
``save_pretrained`` would not write again (Qwen's ``vocab.json`` / ``merges.txt``,
``added_tokens.json``, ``special_tokens_map.json``), so a saved checkpoint has every
file its source had; ``auto_map`` and the chat template are kept by transformers.

The engine never sees text; this wrapper is used by train/eval/serve only.
"""

from __future__ import annotations

import functools
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


# Tokenizer files of a source directory that are copied to a save when it does not write them.
SOURCE_TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")


class Tokenizer:
    """A thin wrapper over a transformers fast tokenizer with the ids dirl needs.

    ``source_files``: name -> bytes of the source directory's :data:`SOURCE_TOKENIZER_FILES`;
    valid only for the unchanged tokenizer (one that adds tokens must not carry them).
    """

    def __init__(self, hf_tokenizer, mask_token: str = MASK_TOKEN, source_files: dict[str, bytes] | None = None):
        self.hf = hf_tokenizer
        self.source_files = dict(source_files or {})
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

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.hf.save_pretrained(str(directory))
        for name, content in self.source_files.items():
            if not (directory / name).exists():
                (directory / name).write_bytes(content)


def char_tokenizer() -> Tokenizer:
    """The built-in character tokenizer (about 100 ids)."""
    from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    for ch in CHAR_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                 mask_token=MASK_TOKEN, additional_special_tokens=CHAR_SPECIALS[1:3])
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return Tokenizer(hf)


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
