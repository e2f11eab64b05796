"""SFT data: rows -> token ids -> (optionally packed) batches, with a resumable cursor.

An example is ``prompt_ids + response_ids`` (DESIGN §6):

* prompt = the chat template over every turn before the last assistant turn,
  with the generation prompt (``<|assistant|>`` / ``<|im_start|>assistant\\n``);
* response = ``encode(last assistant turn) + [end of turn]`` -- the chat
  template's end-of-turn token (``<|im_end|>`` for Qwen / SDAR; the char
  tokenizer's turns end with its EOS), so the model learns to stop where the
  template closes a turn -- then EOS until the whole example is a multiple of the
  block size. Those padding EOS are labelled response tokens (masked and scored
  like any other), so the model learns to end inside a block. Blocks are absolute
  from position 0 of the prompt.

Multi-turn: by default only the last assistant turn is trained and earlier turns
are context; ``assistant_turns="all"`` trains every assistant turn (each ends
with the end-of-turn token; the user turns between them are context). The text
is built turn by turn from the chat template, which must render earlier turns the
same once later turns follow (checked; a template that does not is a DataError).

Every row is tokenised and checked (length <= ``max_length``) before training
starts, so a bad row fails the run at once, naming the row.

Batches: unpacked = one example per row, right-padded to the longest in the
batch; packed = examples laid end to end in rows of ``max_length`` tokens, each
with its own document id (block-diagonal attention) and positions restarting at
0 -- the throughput path. The order is a per-epoch permutation seeded by
``seed + epoch``, so the cursor ``(epoch, position)`` is all resume needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dirl.algo.nelbo import TokenBatch
from dirl.data import DataError, to_sft_messages
from dirl.runtime import epoch_seed
from dirl.train.sft.config import SFTDataConfig


@dataclass
class SFTExample:
    input_ids: list[int]       # prompt + response (+ EOS padding), length a multiple of the block size
    response_mask: list[bool]  # True on trained tokens (assistant turns, their end of turn, the padding)

    @property
    def prompt_len(self) -> int:
        """Tokens before the first trained one."""
        return self.response_mask.index(True)


@dataclass
class SFTBatch(TokenBatch):
    """A collated micro-batch: the (B, L) token fields plus its counts."""

    num_examples: int = 0
    num_tokens: int = 0              # non-padding tokens

    def to(self, device) -> "SFTBatch":
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return SFTBatch(**tensors, num_examples=self.num_examples, num_tokens=self.num_tokens)


def tokenize_example(messages: Sequence[Mapping[str, str]], tokenizer, block_size: int,
                     assistant_turns: str = "last") -> SFTExample:
    """Token ids and trained-token mask of one conversation (see the module docstring)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant if assistant_turns == "all" else assistant[-1:]
    eot = tokenizer.end_of_turn_id
    eot_text = tokenizer.decode([eot], skip_special_tokens=False)
    input_ids: list[int] = []
    mask: list[bool] = []
    rendered = ""  # the text the ids so far stand for
    for turn in trained:
        context = tokenizer.apply_chat_template([dict(m) for m in messages[:turn]], add_generation_prompt=True)
        if not context.startswith(rendered):
            raise DataError("the chat template renders earlier turns differently once later turns follow; "
                            "train the last assistant turn only (data.assistant_turns=last)")
        context_ids = tokenizer.encode(context[len(rendered):])
        response_ids = tokenizer.encode(messages[turn]["content"]) + [eot]
        input_ids += context_ids + response_ids
        mask += [False] * len(context_ids) + [True] * len(response_ids)
        rendered = context + messages[turn]["content"] + eot_text
    padding = -len(input_ids) % block_size
    return SFTExample(input_ids + [tokenizer.eos_token_id] * padding, mask + [True] * padding)


def tokenize_rows(rows: Sequence[Mapping], tokenizer, data: SFTDataConfig, block_size: int,
                  source: str = "data") -> list[SFTExample]:
    """Tokenise every row with ``data``'s template, length limit and assistant turns; a row that
    cannot be templated or is too long is a DataError naming it."""
    examples, max_length = [], data.max_length
    for index, row in enumerate(rows):
        where = f"{source}: row {index}" + (f" (id {row['id']})" if "id" in row else "")
        try:
            example = tokenize_example(to_sft_messages(row, data.prompt_template), tokenizer, block_size,
                                       data.assistant_turns)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if len(example.input_ids) > max_length:
            raise DataError(f"{where}: tokenised example is {len(example.input_ids)} tokens, more than "
                            f"data.max_length={max_length} (field 'response' + prompt); raise max_length "
                            f"or drop the row")
        examples.append(example)
    if not examples:
        raise DataError(f"{source}: no SFT rows")
    return examples


def collate(rows: list[list[SFTExample]], pad_id: int, row_length: int | None = None) -> SFTBatch:
    """Lay out ``rows`` (each a list of examples placed end to end) as tensors.

    ``row_length`` None = the longest row (unpacked batches)."""
    length = row_length or max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    sample = 0
    for r, row in enumerate(rows):
        start = 0
        for doc, example in enumerate(row):
            n = len(example.input_ids)
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(example.input_ids)
            position_ids[r, span] = torch.arange(n)
            doc_ids[r, span] = doc
            sample_ids[r, span] = sample
            response_mask[r, span] = torch.tensor(example.response_mask)
            start += n
            sample += 1
    return SFTBatch(input_ids, position_ids, doc_ids, response_mask, sample_ids,
                    num_examples=sample, num_tokens=int((doc_ids >= 0).sum()))


class SFTLoader:
    """Endless, resumable batches over ``examples`` (reshuffled every epoch)."""

    def __init__(self, examples: list[SFTExample], batch_size: int, pad_id: int, seed: int = 0,
                 pack: bool = False, row_length: int | None = None):
        if pack and row_length is None:
            raise ValueError("packing needs a row_length")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.pack, self.row_length = seed, pack, row_length
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def _peek(self) -> SFTExample:
        return self.examples[self._order[self.position]]

    def _advance(self) -> None:
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)

    def next_batch(self) -> SFTBatch:
        if not self.pack:
            rows = []
            for _ in range(self.batch_size):
                rows.append([self._peek()])
                self._advance()
            return collate(rows, self.pad_id, self.row_length)  # row_length None = longest in batch
        rows, used = [[]], 0
        while True:
            n = len(self._peek().input_ids)
            if used + n > self.row_length:  # start the next row, or stop when the batch is full
                if len(rows) == self.batch_size:
                    break
                rows.append([])
                used = 0
            rows[-1].append(self._peek())
            used += n
            self._advance()
        return collate(rows, self.pad_id, self.row_length)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
