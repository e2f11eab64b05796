"""What a rollout is and how it is sampled: the one sampling spec, shared by every layer.

A leaf module (stdlib and the stdlib-only :mod:`dirl.errors`), so ``algo`` may type its inputs with :class:`Rollout` and the
engine, backends, trainers, ``dirl eval`` and the server all read the same fields.

The sampling settings are declared once, in three nested dataclasses (each adds fields,
none repeats one):

* :class:`PolicyDist` -- the distribution tokens are drawn from (temperature, top-k,
  top-p; DESIGN §5). The RL trainer recomputes log-probs under exactly this.
* :class:`SamplingSpec` -- a ``PolicyDist`` plus how to decode: length, unmasking rule.
  ``RolloutConfig.sampling``, ``EvalSpec.sampling`` and ``ServeConfig.sampling`` hold one.
* :class:`SamplingParams` -- a ``SamplingSpec`` plus what one engine call needs: stop ids,
  samples per prompt, base seed.

:class:`EngineOptions` holds the engine settings a user config exposes (``compile``);
``RolloutConfig``, ``EvalSpec`` and ``ServeConfig`` inherit it, so each key is declared here once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dirl.errors import (FINITE_NON_NEGATIVE, NON_NEGATIVE, OPEN_UNIT_INTERVAL, POSITIVE, UNIT_INTERVAL, UserError,
                         check_fields, one_of)

UNMASKING = ("dynamic", "static", "sequential", "threshold_schedule")


@dataclass
class PolicyDist:
    """The sampling distribution (DESIGN §5): logits / temperature, then top-k, then top-p."""

    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0

    def __post_init__(self) -> None:  # range checks at construction: a config load names the key
        check_fields(self, {"temperature": FINITE_NON_NEGATIVE, "top_k": NON_NEGATIVE, "top_p": OPEN_UNIT_INTERVAL})


@dataclass
class SamplingSpec(PolicyDist):
    """How responses are decoded: the distribution, their length and the unmasking rule."""

    max_new_tokens: int = 64
    unmasking: str = "dynamic"        # dynamic | static | sequential | threshold_schedule (LLaDA2's rule)
    threshold: float = 0.9            # dynamic: commit every position with confidence >= threshold (> for threshold_schedule)
    steps_per_block: int = 4          # static, threshold_schedule: forwards per block

    def __post_init__(self) -> None:
        super().__post_init__()
        # steps_per_block <= block size needs the model: validate() checks it (0: the server's "B").
        check_fields(self, {"max_new_tokens": POSITIVE, "unmasking": one_of(*UNMASKING),
                            "threshold": UNIT_INTERVAL, "steps_per_block": NON_NEGATIVE})

    def params(self, stop_ids=(), n: int = 1, seed: int = 0) -> SamplingParams:
        """This spec as the arguments of one engine call."""
        return SamplingParams(**spec_fields(self), stop_ids=list(stop_ids), n=n, seed=seed)


@dataclass
class SamplingParams(SamplingSpec):
    """A :class:`SamplingSpec` plus the per-call fields of ``Engine.generate``."""

    stop_ids: list[int] = field(default_factory=list)
    n: int = 1                        # samples per prompt
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, {"n": POSITIVE})

    def validate(self, block_size: int) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.unmasking in UNMASKING, f"unmasking must be one of {UNMASKING}, got {self.unmasking!r}"),
            (0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}"),
            (1 <= self.steps_per_block <= block_size,
             f"steps_per_block must be in [1, {block_size}] (1 to the block size), got {self.steps_per_block}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def check_sampling(spec: SamplingSpec, block_size: int, key: str) -> None:
    """What only the model can tell (``steps_per_block`` <= its block size), as a user error
    naming the config section ``key``: called once the model is known, before any decoding."""
    try:
        spec.params().validate(block_size)
    except ValueError as err:
        raise UserError(f"{key}.{err}") from None


SPEC_FIELDS = tuple(f.name for f in fields(SamplingSpec))


def spec_fields(spec: SamplingSpec) -> dict:
    """The :class:`SamplingSpec` fields of ``spec`` (of a ``SamplingParams`` too) as a dict."""
    values = asdict(spec)
    return {name: values[name] for name in SPEC_FIELDS}


@dataclass
class EngineOptions:
    """How the engine runs, not what it samples: inherited by every config that builds an Engine."""

    # The cached denoising step under torch.compile (README "Compiled step"): ~3x faster forwards
    # on CPU, but ~50 s of compiling per process, so it only pays over long or many generations.
    compile: bool = False


@dataclass
class Rollout:
    """One sampled response and its denoising trace.

    ``token_ids`` holds every generated position up to the end of the last block
    (the exact trace DiPO scores); ``num_tokens`` is the completion length (up to
    and including the stop token, at most ``max_new_tokens``). ``steps[i]`` is the
    per-sequence forward counter at which token i was committed (tokens committed
    together share it); ``logps[i]`` its log-prob under the policy distribution and
    ``entropies[i]`` that distribution's entropy at the step it was committed (nats; the
    distribution ``logps`` are taken under, so greedy decoding records the temperature-1
    entropy). ``trace_mc``'s ``entropy`` sampling reads them; a rollout built elsewhere may
    leave them empty.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    steps: list[int]
    logps: list[float]
    num_tokens: int
    finish_reason: str                 # "stop" | "length"
    num_forwards: int
    prompt_index: int = 0
    sample_index: int = 0
    entropies: list[float] = field(default_factory=list)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[: self.num_tokens]
