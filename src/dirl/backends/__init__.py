"""Rollout backends: where the RL trainer's rollouts are decoded.

* ``native`` -- the engine in-process on the trainer's own parameter tensors: an
  optimizer step is visible to the next rollout with no copy (the default).
* ``checkpoint`` -- the peers' reload loop (save the policy, build a fresh engine
  from disk every step), kept for measurement.
* ``http`` -- a client of ``dirl serve``: weights are pushed to the server's
  authenticated ``/update_weights`` after each step, rollouts come back as token ids.
"""

from __future__ import annotations

from dirl.backends.base import RolloutBackend, make_backend

__all__ = ["RolloutBackend", "make_backend"]
