"""Evaluation of a model on question/answer benchmarks (``dirl eval``).

* ``dirl.eval.evaluate`` -- ``EvalConfig`` (an :class:`~dirl.eval.heldout.EvalSpec` plus
  the checkpoint and data source), the task-derived defaults, and ``evaluate(model, tokenizer,
  rows, cfg)``;
* the evaluation itself is :func:`dirl.eval.heldout.evaluate_rows`, the one eval path the
  trainers and the demo share; the correctness rule, pass@k and the summary are
  :mod:`dirl.eval.metrics` (torch-free).

Nothing is re-exported here: the function ``evaluate`` shares its name with its module, and a
package attribute would shadow one or the other. Import from the submodules.
"""
