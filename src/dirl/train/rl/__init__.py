"""``dirl rl``: DiPO and the other estimators, one step at a time.

* :mod:`~dirl.train.rl.config` -- ``RLConfig``, ``RolloutConfig`` (each backend's typed options), ``AlgoConfig``;
* :mod:`~dirl.train.rl.collect` -- steps 1-3: prompts, rollouts, rewards, dynamic sampling (a ``Collector``);
* :mod:`~dirl.train.rl.update` -- step 4: the policy update (a ``Learner``);
* :mod:`~dirl.train.rl.critic` -- step 4 with ``algo.critic=value``: TraceRL's value model;
* :mod:`~dirl.train.rl.loop` -- set-up and the loop (``train_rl``), step 5: sync, eval, log, save.
"""
