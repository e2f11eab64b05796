"""Training: the shared pieces here, one subpackage per objective.

* :mod:`~dirl.train.config` -- ``TrainerConfig``, the settings both trainers share (declared once);
* :mod:`~dirl.train.setup` -- the one set-up both trainers run (seed, device, process group, model);
* :mod:`~dirl.train.models` -- the trainer-side model: what a run starts from, block size, LoRA checks, DiPO's reference;
* :mod:`~dirl.train.optim` -- optimizer, schedule, the guarded step; :mod:`~dirl.train.state` -- checkpoints, RNG;
* :mod:`~dirl.train.tracking` -- metrics logging; :mod:`~dirl.train.dist` -- DDP / FSDP2; :mod:`~dirl.train.precision`;
* :mod:`~dirl.train.sft` and :mod:`~dirl.train.rl` -- the two trainers; :mod:`~dirl.train.trainers` -- the Python API.

Imports flow one way: the subpackages import the shared modules, never each other.
"""
