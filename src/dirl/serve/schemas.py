"""Request models of the OpenAI-compatible API, with the dLLM and RL extensions.

Standard OpenAI fields: ``model``, ``prompt`` / ``messages``, ``n``,
``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``, ``top_p``,
``stop`` (strings, matched in the decoded text; the text is cut before the
match), ``seed``, ``stream`` (+ ``stream_options.include_usage``), and the
log-prob fields (:mod:`dirl.serve.logprobs`): completions ``logprobs: k`` and
``echo``, chat ``logprobs: true`` and ``top_logprobs: k`` -- generated tokens'
log-probs as the engine recorded them, echoed prompt tokens' as the exact
left-to-right (one token per step) trace score. What cannot be provided is a
400 (log-probs with ``stream``, more than 20 alternatives). Other unknown
fields (``user``, ...) are accepted and ignored, as the OpenAI client may send them.

Extensions:

* dLLM decoding: every :class:`~dirl.rollout.SamplingSpec` field by its own name --
  ``top_k`` (0 = off), ``unmasking`` (dynamic | static | sequential | threshold_schedule), ``threshold``
  (dynamic's confidence threshold), ``steps_per_block`` (static's forwards per block).
  A field left out (or null) takes the server's default, ``ServeConfig.sampling``
  (``steps_per_block``: the block size).
* ``stop_token_ids``: extra ids that end a completion. The tokenizer's EOS /
  end-of-turn ids are always added unless ``ignore_eos`` is true (then the
  stop ids are exactly ``stop_token_ids`` -- what an RL client wants).
* ``prompt`` may be token ids (a list of ints, or a list of such lists) --
  RL clients send ids, never text.
* ``return_token_ids: true`` adds to every choice: ``prompt_token_ids``,
  ``token_ids`` (every generated position to the end of the last decoded block:
  the trace DiPO scores), ``num_tokens`` (completion length inside
  ``token_ids``, up to and including the stop token), ``steps`` (per token, the
  forward at which it was unmasked), ``logps`` (per token, its log-prob under
  the sampling distribution), ``entropies`` (per token, that distribution's
  entropy), ``num_forwards`` and ``seed``.

Every completion response also carries a top-level ``weight_version`` (0 at
start-up, +1 per successful ``/update_weights``): the weights it was decoded with.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Optional, Union, get_type_hints

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from dirl.rollout import SamplingSpec


def _prompt_kind(value: Any) -> str:
    """Which prompt form ``value`` is, from its first element: a tagged union validates the one
    form (a plain union tries every form on every element, seconds for a long list of ids)."""
    if isinstance(value, str):
        return "text"
    first = value[0] if isinstance(value, list) and value else None
    return "text_batch" if isinstance(first, str) else "ids_batch" if isinstance(first, list) else "ids"


# Text, token ids, or a batch of either.
PromptType = Annotated[Union[Annotated[str, Tag("text")], Annotated[list[str], Tag("text_batch")],
                             Annotated[list[int], Tag("ids")], Annotated[list[list[int]], Tag("ids_batch")]],
                       Discriminator(_prompt_kind)]


# The decoding fields are SamplingSpec's own, by name and type, all optional: a request that
# leaves one out gets the server's default (ServeConfig.sampling). max_new_tokens travels as
# OpenAI's max_tokens. Generated, so a new decoding option needs no edit here.
_SPEC_TYPES = get_type_hints(SamplingSpec)
DECODING_FIELDS = tuple(f.name for f in fields(SamplingSpec) if f.name != "max_new_tokens")
DecodingFields = create_model("DecodingFields", __config__=ConfigDict(extra="ignore"),
                              **{name: (Optional[_SPEC_TYPES[name]], None) for name in DECODING_FIELDS})


class SamplingFields(DecodingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # stop ids and RL outputs
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    return_token_ids: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: PromptType
    logprobs: int | bool | None = None  # alternatives per token (a bool is refused: that is chat's spelling)
    echo: bool = False                  # prepend the prompt (and its log-probs) to each choice


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message content as text (content parts of type ``text`` are concatenated)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer OpenAI name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
