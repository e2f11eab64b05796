"""Test-only reward functions, importable as ``rl_rewards:<name>`` with tests/ on the path.

A random tiny model never solves a task, so its task reward is constant and gives
no gradient; these rewards vary across random completions, so RL steps move the
policy.
"""


def digit_fraction(completions, **_):
    """Share of digit characters in the completion."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
