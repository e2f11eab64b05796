"""Rule-based rewards for math reasoning RL (a leaf package: it imports nothing else from dirl).

A reward is any callable returning ``list[float | None]`` (one score per completion; None = not
applicable), called with TRL's keyword signature (``prompts``, ``completions``, ``completion_ids``,
dataset columns by name, ``**kwargs``) or dirl's ``fn(completions, **columns)``
(``dirl.rewards.scoring``). Registered:

* ``math``      -- last ``\\boxed{}`` vs ``answer`` via math-verify (``dirl.rewards.math``)
* ``gsm8k``     -- boxed or ``#### N`` number vs ``answer``, exact numeric match
* ``countdown`` -- expression over ``numbers`` reaching ``target`` (``dirl.rewards.countdown``)
* ``sudoku``    -- cell accuracy vs ``solution`` on ``puzzle``'s blanks (``dirl.rewards.sudoku``)
* ``code``, ``code_io``, ``code_io_fraction`` -- programs run against tests in a sandbox
  (``dirl.rewards.code``, ``dirl.rewards.sandbox``)

Use ``compute_rewards(specs, completions, columns)`` for weighted, fault-isolated scoring, and
:mod:`dirl.eval.metrics` for the correctness rule, pass@k and the eval summary.
"""

from dirl.rewards import code, countdown, math, sudoku  # noqa: F401 - imported to register the rewards
from dirl.rewards.registry import (
    RewardError,
    available_rewards,
    format_reward_spec,
    get_reward,
    parse_reward_spec,
    register,
    resolve_reward,
)
from dirl.rewards.scoring import (
    RewardResult,
    RewardSpecs,
    completion_text,
    compute_rewards,
)

__all__ = ["RewardError", "RewardResult", "RewardSpecs", "available_rewards", "completion_text",
           "compute_rewards", "format_reward_spec", "get_reward", "parse_reward_spec", "register",
           "resolve_reward"]
