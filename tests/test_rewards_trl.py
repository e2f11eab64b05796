"""TRL-signature rewards in ``compute_rewards``: the reward functions of TRL's GRPOTrainer docs
(docs/source/grpo_trainer.md, "Using a custom reward function"), unchanged, with the outputs the
docs state; None = not applicable; call-form inspection; failing rewards."""

from __future__ import annotations

import functools
import math
import re

import pytest

from dirl.rewards import RewardError, compute_rewards

# ----------------------------------------------------------------------------- TRL's examples, verbatim


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def reward_func_tokens(completions_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completions_ids]


def reward_func_chars(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func_reference(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def math_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for prompt, completion, t in zip(prompts, completions, task):
        if t == "math":
            correct = completion.strip() == str(eval(prompt.split()[-1].rstrip("?")))
            reward = 1.0 if correct else -1.0
            rewards.append(reward)
        else:
            rewards.append(None)
    return rewards


def test_trl_length_rewards_tokens_and_characters():
    # TRL: prompts ["The sky is", "The sun is"], completions [" blue.", " in the sky."],
    # completions_ids [[6303, 13], [304, 279, 12884, 13]] -> [2.0, 4.0] (tokens), [6.0, 12.0] (chars)
    prompts, completions = ["The sky is", "The sun is"], [" blue.", " in the sky."]
    ids = [[6303, 13], [304, 279, 12884, 13]]
    tokens = compute_rewards([reward_func_tokens], completions, prompts=prompts, completion_ids=ids)
    assert tokens.total == [2.0, 4.0]
    chars = compute_rewards([reward_func_chars], completions, prompts=prompts, completion_ids=ids)
    assert chars.total == [6.0, 12.0]
    assert chars.metrics["rewards/reward_func_chars/mean"] == 9.0
    assert chars.metrics["rewards/reward_func_chars/std"] == pytest.approx(math.sqrt(18.0))  # sample std
    quick = compute_rewards({reward_len: 0.5}, ["x" * 18, "y" * 25])
    assert quick.total == [-1.0, -2.5]


def test_trl_format_reward_gets_conversational_completions():
    # TRL: a conversational dataset -> completions are [{"role": "assistant", "content": ...}]
    prompts = [[{"role": "assistant", "content": "What is the result of (1 + 2) * 4?"}],
               [{"role": "assistant", "content": "What is the result of (3 + 1) * 2?"}]]
    completions = ["<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12.</think>"
                   "<answer>(1 + 2) * 4 = 12</answer>",
                   "The sum of 3 and 1 is 4, which we multiply by 2 to get 8. So (3 + 1) * 2 = 8."]
    result = compute_rewards([format_reward_func], completions, prompts=prompts)
    assert result.total == [1.0, 0.0]
    # the built-in rewards read either format
    boxed = compute_rewards(["math"], ["\\boxed{12}", "\\boxed{7}"], {"answer": ["12", "8"]}, prompts=prompts)
    assert boxed.total == [1.0, 0.0]


def test_trl_reference_reward_takes_a_dataset_column_by_name():
    prompts = ["Problem: Solve the equation $2x + 3 = 7$. Solution:", "Problem: Solve the equation $3x - 5 = 10$."]
    completions = [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."]
    result = compute_rewards([reward_func_reference], completions, {"ground_truth": ["2", "5"], "prompt": prompts},
                             prompts=prompts)
    assert result.total == [1.0, 0.0]


def test_trl_multi_task_none_is_left_out_of_the_weighted_sum():
    prompts = ["What is 2+2?", "Write a function that returns the sum of two numbers.", "What is 3*4?"]
    task = ["math", "code", "math"]
    result = compute_rewards({math_reward_func: 2.0, reward_func_chars: 0.0}, ["4", "def f", "11"], {"task": task},
                             prompts=prompts)
    assert result.per_reward["math_reward_func"] == [1.0, None, -1.0]
    assert result.total == [2.0, 0.0, -2.0]
    assert result.metrics["rewards/math_reward_func/mean"] == 0.0  # over the two applicable rows


# ----------------------------------------------------------------------------- call forms


def test_call_form_is_picked_by_inspection():
    seen = {}

    def keyword_only(*, completions, answer):  # no **kwargs: gets only what it names
        seen["keyword_only"] = answer
        return [1.0] * len(completions)

    def dirl_form(texts, answer, **columns):  # legacy: first parameter = completions, positionally
        seen["dirl_form"] = sorted(columns)
        return [float(t == a) for t, a in zip(texts, answer)]

    def with_default(completions, bonus=3.0):
        return [bonus] * len(completions)

    result = compute_rewards([keyword_only, dirl_form, functools.partial(with_default, bonus=0.5)], ["1", "2"],
                             {"answer": ["1", "3"], "level": [1, 2]}, prompts=["p", "q"], completion_ids=[[1], [2]])
    assert seen["keyword_only"] == ["1", "3"]
    assert seen["dirl_form"] == ["completion_ids", "completions_ids", "level", "prompts"]
    assert result.per_reward["dirl_form"] == [1.0, 0.0]
    assert result.per_reward["with_default"] == [0.5, 0.5]
    assert all(v == 0.0 for k, v in result.metrics.items() if k.endswith("/errors"))


def test_a_missing_argument_is_a_caller_error_naming_it():
    with pytest.raises(ValueError, match="'ground_truth'.*columns: answer"):
        compute_rewards([reward_func_reference], ["a"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="two rewards are named"):
        compute_rewards([reward_len, reward_len], ["a"])


def test_a_reward_failing_on_every_completion_is_reported():
    def broken(completions, **kwargs):
        raise KeyError("solution")

    result = compute_rewards([broken, reward_func_chars], ["ab", "c"])
    assert result.total == [2.0, 1.0] and result.metrics["rewards/broken/errors"] == 2.0
    assert "broken" in result.failures and "KeyError" in result.failures["broken"]
    with pytest.raises(RewardError, match="reward 'broken' failed on all 2 completions.*KeyError"):
        result.raise_if_all_failed()
    partly = compute_rewards([lambda completions, **kw: [1 / len(c) for c in completions]], ["a", ""])
    assert partly.failures == {}
    partly.raise_if_all_failed()  # one good row: a run goes on
