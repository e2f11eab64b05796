"""Evaluation on question/answer benchmarks: ``dirl eval`` and the trainers' held-out eval.

* :mod:`~dirl.eval.heldout` -- ``EvalSpec`` and :func:`~dirl.eval.heldout.evaluate_rows`, the one
  eval path (``dirl eval``, the SFT and RL trainers' ``eval.every`` and the demo all call it);
* :mod:`~dirl.eval.metrics` -- the correctness rule, pass@k and the summary (torch-free);
* :mod:`~dirl.eval.config` -- ``EvalConfig`` (an ``EvalSpec`` plus checkpoint and data source),
  the task-derived defaults and the rows of ``dirl eval``.
"""
