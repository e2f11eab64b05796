"""Test-only reward functions, importable as ``rl_rewards:<name>`` with tests/ on the path.

A random tiny model never solves a task, so its task reward is constant and gives
no gradient; these rewards vary across random completions, so RL steps move the
policy.
"""


def digit_fraction(completions, **_):
    """Share of digit characters in the completion."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def informative_unless_even(completions, answer, **_):
    """1.0 for every completion of a prompt whose answer is even (a group without signal);
    otherwise the completion's place in its group of 4, over 3 (a group that always varies).
    Deterministic, so a test knows exactly which groups dynamic sampling must drop."""
    return [1.0 if int(a) % 2 == 0 else (i % 4) / 3 for i, a in enumerate(answer)]


def always_raises(prompts, completions, **_):
    """A TRL-signature reward that fails on every completion (the first-step stop)."""
    raise KeyError("solution")
