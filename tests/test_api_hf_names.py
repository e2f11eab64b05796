"""The Python API speaks TRL / transformers where the concept is the same (issue 31, item 7)."""

from __future__ import annotations

import pytest
import transformers

import dirl
from dirl.train.callbacks import CallbackList, HFCallback


def test_hf_names_set_the_dirl_keys_and_others_name_the_dirl_setting():
    sft = dirl.SFTConfig(output_dir="x", learning_rate=3e-4, max_length=128, gradient_accumulation_steps=2)
    assert (sft.out, sft.optim.lr, sft.data.max_length, sft.optim.grad_accum) == ("x", 3e-4, 128, 2)
    rl = dirl.RLConfig(num_generations=4, max_completion_length=48, beta=0.02, epsilon_high=0.3)
    assert (rl.rollout.group_size, rl.rollout.sampling.max_new_tokens, rl.algo.beta, rl.algo.clip_high) == (
        4, 48, 0.02, 0.3)
    with pytest.raises(TypeError, match="max_steps"):
        dirl.SFTConfig(num_train_epochs=3)
    with pytest.raises(TypeError, match="algo.agg"):
        dirl.RLConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="lr"):  # the aliased value is validated like the dirl key
        dirl.SFTConfig(learning_rate=-1.0)


def test_report_to_takes_a_string_and_rl_device_is_auto():
    assert dirl.SFTConfig(report_to="none").report_to == []
    assert dirl.RLConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert dirl.RLConfig(report_to="all").report_to == ["jsonl", "tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        dirl.SFTConfig(report_to="mlflow")
    assert dirl.RLConfig().device == dirl.SFTConfig().device == "auto"


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.steps, self.logs, self.saves = [], [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(logs)

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1


def test_hf_callbacks_get_state_and_logs():
    recorder = Recorder()
    callbacks = CallbackList([recorder], args=dirl.SFTConfig(max_steps=5))
    assert isinstance(callbacks.callbacks[0], HFCallback)
    callbacks.on_step_end(1, {"loss": 2.5, "note": "x"})
    callbacks.on_step_end(2, {"loss": 2.0})
    callbacks.on_save(2, None)
    assert recorder.steps == [1, 2] and recorder.logs == [{"loss": 2.5}, {"loss": 2.0}] and recorder.saves == 1
    assert callbacks.callbacks[0].state.max_steps == 5


def test_trainer_state_save_model_evaluate(tmp_path):
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
    args = dirl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, progress=False,
                          report_to="none", save_every=0)
    trainer = dirl.SFTTrainer("init:tiny", train_dataset=rows, args=args, callbacks=[Recorder()])
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 2
    assert [r["step"] for r in trainer.state.log_history] == [2]
    saved = trainer.save_model(tmp_path / "saved")
    assert (saved / "config.json").exists()
    result = trainer.evaluate(rows[:3], reward="math", sampling=dirl.SamplingSpec(max_new_tokens=4, temperature=0))
    assert result["eval_num_questions"] == 3 and 0 <= result["eval_accuracy"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_processing_class_is_the_tokenizer():
    model, tokenizer = dirl.load_model("init:tiny")
    trainer = dirl.SFTTrainer(model, processing_class=tokenizer)
    assert trainer.tokenizer is tokenizer
    with pytest.raises(ValueError, match="processing_class"):
        dirl.DiPOTrainer(model, tokenizer=tokenizer, processing_class=object())


def test_dirl_evaluate_with_a_callable_reward():
    rows = [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}]
    seen = []

    def exact(completions, answer, **kwargs):
        seen.extend(completions)
        return [1.0] * len(completions)  # everything correct: accuracy 1 by construction

    result = dirl.evaluate("init:tiny", rows, reward=exact, sampling=dirl.SamplingSpec(max_new_tokens=4))
    assert result["accuracy"] == 1.0 and result["num_questions"] == 2 and len(seen) == 2
    assert result["samples"][0]["rewards"] == {"exact": 1.0}
