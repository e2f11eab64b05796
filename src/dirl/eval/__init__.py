"""Evaluation of a model on question/answer benchmarks (``dirl eval``).

* ``dirl.eval.evaluate`` -- ``EvalConfig`` and ``evaluate(model, tokenizer, rows, cfg)``, the
  in-process entry point (used by ``dirl eval``, the RL trainer and the demo);
* ``dirl.eval.metrics`` -- the correctness rule, unbiased pass@k and the summary (torch-free).

Nothing is re-exported here: the function ``evaluate`` shares its name with its module, and a
package attribute would shadow one or the other. Import from the submodules.
"""
