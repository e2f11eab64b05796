"""Tokenizers: the built-in char tokenizer and the real Qwen/SDAR tokenizer."""

from __future__ import annotations

import json

import pytest

from dirl.model.tokenizer import CHAR_SPECIALS, MASK_TOKEN, char_tokenizer, load_tokenizer

TEXT = "Q: 12+34=?\nA: 46. {x_1} (ok) ~!"


def test_char_round_trip(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT)  # one id per character
    assert tokenizer.decode(ids) == TEXT
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_char_specials_are_single_ids(tokenizer):
    ids = {tok: tokenizer.encode(tok) for tok in CHAR_SPECIALS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert ids[MASK_TOKEN] == [tokenizer.mask_token_id]
    assert ids["<|endoftext|>"] == [tokenizer.eos_token_id] and tokenizer.stop_ids() == [tokenizer.eos_token_id]
    assert len({v[0] for v in ids.values()}) == len(CHAR_SPECIALS)
    mixed = tokenizer.encode("ab<|MASK|>c")
    assert mixed == tokenizer.encode("ab") + [tokenizer.mask_token_id] + tokenizer.encode("c")
    assert tokenizer.decode(mixed) == "abc"  # specials skipped by default
    assert tokenizer.decode(mixed, skip_special_tokens=False) == "ab<|MASK|>c"


def test_char_chat_template(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}]
    assert tokenizer.apply_chat_template(messages) == "<|user|>2+2?<|assistant|>"
    full = messages + [{"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(full, add_generation_prompt=False) == "<|user|>2+2?<|assistant|>4<|endoftext|>"


def test_char_save_load_gives_same_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXT) == tokenizer.encode(TEXT)
    assert (loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (
        tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_char_tokenizer_is_deterministic():
    assert char_tokenizer().encode(TEXT) == char_tokenizer().encode(TEXT)


def test_missing_tokenizer_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


def test_real_qwen_tokenizer(sdar_tokenizer, tmp_path):
    tok = sdar_tokenizer
    assert tok.mask_token_id == 151669
    assert tok.eos_token_id == 151643
    assert tok.stop_ids() == [151643, 151645]
    assert tok.encode("<|im_start|>") == [151644]
    text = "Solve 3x + 5 = 11. Put the answer in \\boxed{}."
    ids = tok.encode(text)
    assert len(ids) < len(text) and tok.decode(ids) == text  # BPE merges, lossless
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert "<|im_start|>user" in rendered and rendered.rstrip().endswith("<|im_start|>assistant")
    tok.save(tmp_path)  # unchanged: the source's files, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(tok.source_files)
    assert all((tmp_path / name).read_bytes() == content for name, content in tok.source_files.items())
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == ids and again.mask_token_id == 151669


def test_a_changed_tokenizer_is_written_portably(tokenizer, tmp_path):
    """The char tokenizer (no source files) and a tokenizer that gained a token are written by
    transformers, with a tokenizer_config.json transformers 4 reads too (no 5.x-only class)."""
    from dirl.model.tokenizer import Tokenizer

    loaded = load_tokenizer(_saved(tokenizer, tmp_path / "a"))
    assert loaded.unchanged()
    loaded.hf.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert not loaded.unchanged()
    out = _saved(loaded, tmp_path / "b")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in config
    again = load_tokenizer(out)
    assert again.encode("<|new|>1+2") == loaded.encode("<|new|>1+2") and again.vocab_size == tokenizer.vocab_size + 1
    assert again.decode(again.encode("<|user|>hi")) == "hi"  # still special
    assert isinstance(again, Tokenizer)


def _saved(tok, directory):
    directory.mkdir()
    tok.save(directory)
    return directory
