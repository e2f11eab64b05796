"""``dirl sft``: supervised fine-tuning with the blockwise NELBO.

* :mod:`~dirl.train.sft.config` -- ``SFTConfig`` (the shared ``TrainerConfig`` + data, batching, masking);
* :mod:`~dirl.train.sft.data` -- rows -> token ids -> (packed) batches, with a resumable cursor;
* :mod:`~dirl.train.sft.loop` -- set-up, the guarded step, eval, checkpoints (``train_sft``).
"""
