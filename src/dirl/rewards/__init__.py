"""Rule-based rewards for math reasoning RL (a leaf package: it imports nothing else from dirl).

Every reward has the TRL-style signature ``fn(completions, **columns) -> list[float | None]``
(columns are dataset columns aligned with ``completions``; None = not applicable). Registered:

* ``math``      -- last ``\\boxed{}`` vs ``answer`` via math-verify (``dirl.rewards.math``)
* ``gsm8k``     -- boxed or ``#### N`` number vs ``answer``, exact numeric match
* ``countdown`` -- expression over ``numbers`` reaching ``target`` (``dirl.rewards.countdown``)
* ``sudoku``    -- cell accuracy vs ``solution`` on ``puzzle``'s blanks (``dirl.rewards.sudoku``)

Use ``compute_rewards(specs, completions, columns)`` for weighted, fault-isolated scoring, and
:mod:`dirl.rewards.metrics` for the correctness rule, pass@k and the eval summary.
"""

from dirl.rewards import countdown, math, sudoku  # noqa: F401 - imported to register the rewards
from dirl.rewards.registry import (
    RewardResult,
    available_rewards,
    compute_rewards,
    format_reward_spec,
    get_reward,
    parse_reward_spec,
    register,
)

__all__ = ["RewardResult", "available_rewards", "compute_rewards", "format_reward_spec", "get_reward",
           "parse_reward_spec", "register"]
