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
# The full-attention decoder's rules besides ``dynamic`` (dirl.engine.full_attention): LLaDA's
# low_confidence / random remasking, Dream's origin / maskgit_plus / topk_margin / entropy.
FULL_ATTENTION_UNMASKING = ("low_confidence", "random", "origin", "maskgit_plus", "topk_margin", "entropy")
FULL_ATTENTION_RULES = FULL_ATTENTION_UNMASKING + ("dynamic",)  # what the full-attention decoder runs


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
    #                                   (+ FULL_ATTENTION_UNMASKING on full-attention models)
    threshold: float = 0.9            # dynamic: commit every position with confidence >= threshold (> for threshold_schedule)
    steps_per_block: int = 4          # static, threshold_schedule, the full-attention schedules: forwards per block
    block_length: int = 0             # full attention: the semi-AR block; 0 = the model's default
    alg_temp: float = 0.0             # Dream's rules: > 0 draws positions from softmax(confidence / alg_temp)
    eps: float = 1e-3                 # Dream's rules: the schedule linspace(1, eps, steps + 1)
    cache: str = "none"               # full attention: none (exact) | prefix | dual (Fast-dLLM, approximate)

    def __post_init__(self) -> None:
        super().__post_init__()
        # steps_per_block <= block size needs the model: validate() checks it (0: the server's "B").
        check_fields(self, {"max_new_tokens": POSITIVE, "unmasking": one_of(*UNMASKING, *FULL_ATTENTION_UNMASKING),
                            "threshold": UNIT_INTERVAL, "steps_per_block": NON_NEGATIVE, "block_length": NON_NEGATIVE,
                            "alg_temp": FINITE_NON_NEGATIVE, "eps": OPEN_UNIT_INTERVAL,
                            "cache": one_of("none", "prefix", "dual")})

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

    def validate(self, block_size: int, rules: tuple[str, ...] = UNMASKING) -> None:
        """``rules``: the unmasking rules of the decoder that will run (block-causal by default)."""
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.unmasking in rules, f"unmasking must be one of {rules}, got {self.unmasking!r}"),
            (0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}"),
            (1 <= self.steps_per_block <= block_size,
             f"steps_per_block must be in [1, {block_size}] (1 to the block size), got {self.steps_per_block}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def check_for_model(params: SamplingParams, arch) -> None:
    """``params.validate`` against the model that decodes them (``arch``: its
    :class:`~dirl.model.arch.Arch`): its block size and its decoder's rules (ValueError)."""
    if arch.attention == "bidirectional":  # the block is the sampler's block_length (0: the model's default)
        params.validate(min(params.block_length or arch.block_size, params.max_new_tokens), FULL_ATTENTION_RULES)
    else:
        params.validate(arch.block_size)


def check_sampling(spec: SamplingSpec, arch, key: str, context: int | None = None, longest_prompt: int = 0) -> None:
    """What only the model can tell (``steps_per_block`` <= its block size, its decoder's rules; with
    ``context``, the longest prompt + ``max_new_tokens`` <= the model's context, as the server checks),
    as a user error naming the config section ``key``: called once the model is known, before decoding."""
    try:
        check_for_model(spec.params(), arch)
    except ValueError as err:
        raise UserError(f"{key}.{err}") from None
    if context is not None and longest_prompt + spec.max_new_tokens > context:
        prompt = f"the longest prompt ({longest_prompt} tokens) + " if longest_prompt else ""
        raise UserError(f"{key}.max_new_tokens: {prompt}max_new_tokens ({spec.max_new_tokens}) exceeds the "
                        f"model's context of {context} tokens")


SPEC_FIELDS = tuple(f.name for f in fields(SamplingSpec))


def spec_fields(spec: SamplingSpec) -> dict:
    """The :class:`SamplingSpec` fields of ``spec`` (of a ``SamplingParams`` too) as a dict."""
    values = asdict(spec)
    return {name: values[name] for name in SPEC_FIELDS}


BATCHING = ("continuous", "shared")  # the engine's batching policies a config may name


@dataclass
class EngineOptions:
    """How the engine runs, not what it samples: inherited by every config that builds an Engine."""

    # The cached denoising step under torch.compile (README "Compiled step"): ~3x faster forwards
    # on CPU, but ~50 s of compiling per process, so it only pays over long or many generations.
    compile: bool = False
    # continuous: a finished row's place goes to the next waiting row. shared: every row that fits
    # max_batch_tokens is admitted (with its KV cache row) and each forward runs the least advanced
    # ones, so long rows start early and the batch stays full (dirl.engine.scheduler).
    batching: str = "continuous"
    max_batch_tokens: int = 0         # KV budget: live rows x (prompt + max_new_tokens + 2 blocks); 0 = rows only

    def __post_init__(self) -> None:
        check_fields(self, {"batching": one_of(*BATCHING), "max_batch_tokens": NON_NEGATIVE})

    def engine_options(self) -> dict:
        """These fields as :class:`~dirl.engine.engine.Engine` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(EngineOptions)}


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
