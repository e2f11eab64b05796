"""Conversation formats (OpenAI messages, ShareGPT, TRL prompt/completion), in-memory datasets,
multi-turn SFT targets and the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from dirl.data import DataError, load_prompt_rows, load_sft_rows, to_prompt_messages, to_sft_messages
from dirl.data.datasets import reward_prompt
from dirl.model.tokenizer import char_tokenizer
from dirl.train.sft.data import tokenize_example, tokenize_rows
from dirl.train.sft.config import SFTDataConfig


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"}]
SHAREGPT = {"id": 7, "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "1+1?"},
                                       {"from": "gpt", "value": "2"}, {"from": "human", "value": "and 2+2?"},
                                       {"from": "gpt", "value": "4"}]}


def test_sharegpt_rows_load_as_messages(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n")
    (row,) = load_sft_rows(path)
    assert row == {"id": 7, "messages": CHAT}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}
    path.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"sharegpt\.jsonl:2: field 'conversations\[1\]\.from' must be one of"):
        load_sft_rows(path)


def test_in_memory_lists_and_datasets() -> None:
    rows = [{"prompt": "What is 2+2?", "completion": "4"},
            {"prompt": [{"role": "user", "content": "3*4?"}], "completion": [{"role": "assistant", "content": "12"}]}]
    for source in (rows, datasets.Dataset.from_list(rows[:1])):
        loaded = load_sft_rows(source)
        assert to_sft_messages(loaded[0], "plain") == [{"role": "user", "content": "What is 2+2?"},
                                                      {"role": "assistant", "content": "4"}]
    assert to_sft_messages(load_sft_rows(rows)[1], "plain")[1] == {"role": "assistant", "content": "12"}
    with pytest.raises(DataError, match=r"row 1: field 'completion' is empty"):
        load_sft_rows([rows[0], {"prompt": "x", "completion": " "}])
    with pytest.raises(DataError, match="a list of dicts or a datasets.Dataset"):
        load_sft_rows(42)
    # RL prompts: TRL's prompt column (no answer needed), a messages prompt, a question row
    prompts = load_prompt_rows([{"prompt": "2+2?", "task": "math"}, {"messages": CHAT[:2]},
                                {"question": "Q", "answer": "1"}])
    assert [to_prompt_messages(r, "plain") for r in prompts[:2]] == [[{"role": "user", "content": "2+2?"}], CHAT[:2]]
    assert [reward_prompt(r, "plain") for r in prompts] == ["2+2?", CHAT[:2], "Q"]
    with pytest.raises(DataError, match=r"row 0: missing field 'answer'"):
        load_prompt_rows([{"question": "Q"}])


def test_sft_targets_end_with_the_templates_end_of_turn_token(sdar_tokenizer) -> None:
    qwen = sdar_tokenizer
    example = tokenize_example(CHAT[:3], qwen, block_size=4)
    trained = [i for i, keep in zip(example.input_ids, example.response_mask) if keep]
    im_end, eos = qwen.hf.convert_tokens_to_ids("<|im_end|>"), qwen.eos_token_id
    assert qwen.end_of_turn_id == im_end != eos
    assert trained[:len(qwen.encode("2")) + 1] == qwen.encode("2") + [im_end]
    assert set(trained[len(qwen.encode("2")) + 1:]) <= {eos}  # block padding only
    assert len(example.input_ids) % 4 == 0
    # the char tokenizer's template ends a turn with its EOS: ids as before this change
    char = char_tokenizer()
    example = tokenize_example(CHAT[:3], char, block_size=4)
    prompt = char.encode(char.apply_chat_template(CHAT[:2], add_generation_prompt=True))
    response = char.encode("2") + [char.eos_token_id]
    response += [char.eos_token_id] * (-(len(prompt) + len(response)) % 4)
    assert example.input_ids == prompt + response and example.prompt_len == len(prompt)
    assert example.response_mask == [False] * len(prompt) + [True] * len(response)


@pytest.mark.parametrize("tokenizer_name", ["char", "qwen"])
def test_multi_turn_trains_every_assistant_turn_on_request(tokenizer_name, request) -> None:
    tok = char_tokenizer() if tokenizer_name == "char" else request.getfixturevalue("sdar_tokenizer")
    last = tokenize_example(CHAT, tok, 4, "last")
    every = tokenize_example(CHAT, tok, 4, "all")
    assert every.input_ids == last.input_ids  # the same text, more of it trained
    # the context of the last turn is what inference sees: the template with its generation prompt
    context = tok.apply_chat_template(CHAT[:4], add_generation_prompt=True)
    assert tok.decode(every.input_ids, skip_special_tokens=False).startswith(context + "4")
    eot = tok.end_of_turn_id

    def trained_text(example):
        ids = [i if keep else None for i, keep in zip(example.input_ids, example.response_mask)]
        spans, current = [], []
        for i in ids + [None]:
            if i is None and current:
                spans.append([t for t in current if t != tok.eos_token_id or t == eot])
                current = []
            elif i is not None:
                current.append(i)
        return [tok.decode(s) for s in spans]

    assert trained_text(last) == ["4"]
    assert trained_text(every) == ["2", "4"]
    assert sum(every.response_mask) == sum(last.response_mask) + len(tok.encode("2")) + 1
    rows = [{"messages": CHAT}]
    examples = tokenize_rows(rows, tok, SFTDataConfig(prompt_template="plain", max_length=256,
                                                      assistant_turns="all"), 4)
    assert examples[0].response_mask == every.response_mask
