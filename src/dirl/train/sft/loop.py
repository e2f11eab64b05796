"""``dirl sft``: supervised fine-tuning with the blockwise NELBO (DESIGN §6, §10).

The loop (``train_sft``), in numbered sections:

1. setup -- the shared :func:`dirl.train.setup.setup` (seed, device, model), then
   tokenise and validate *every* row (a bad row stops the run before any training);
2. optimizer, schedule, loader, noise generator -- then restore all of them
   (and the RNGs) from a checkpoint when resuming;
3. steps -- ``grad_accum`` micro-batches of :func:`dirl.algo.nelbo.sft_nelbo` (or, with
   ``objective=autoregressive``, :func:`dirl.algo.autoregressive.sft_autoregressive`),
   one :func:`clip_and_step` (NaN/inf guard: a non-finite gradient skips the
   step and keeps the weights; ``skipped_steps`` counts them);
4. logging / held-out eval / checkpoints every ``log_every`` / ``eval.every`` /
   ``save_every`` steps;
5. the end -- a last checkpoint and the HF model directory ``run_dir/final``.

Exact resume: the data order is a per-epoch permutation (cursor = epoch,
position), the masks come from a dedicated generator whose state is saved, and
optimizer, scheduler and global RNGs are restored, so N straight steps and
N/2 + resume + N/2 give identical losses and bitwise-identical weights on CPU
(fp32). ``stop_at_step`` ends an invocation early (as a preemption would) without
changing the schedule, which always spans ``max_steps``.

Data parallel (``torchrun``, :mod:`dirl.train.dist`): ``batch_size`` is the
*global* number of examples per micro-batch. Every rank draws the same global
batch and its masks (same loader cursor, same noise generator), then trains on
its contiguous share of the rows. A rank's loss is its samples' NELBO sum
divided by the number of samples in the *global* batch, times the world size
(DDP / FSDP2 average gradients), so the update equals a single process's on the
whole batch, and a checkpoint (cursor, noise RNG, full optimizer state) resumes
on any number of ranks. Only rank 0 logs and writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dirl import config as config_lib
from dirl.algo.autoregressive import sft_autoregressive
from dirl.algo.nelbo import NoiseDraw, draw_noise, response_counts, sft_nelbo
from dirl.data import load_prompt_rows, load_sft_rows, task_of
from dirl.eval.heldout import DEFAULT_REWARD, EvalSpec, evaluate_rows, held_out_metrics
from dirl.rollout import check_sampling
from dirl.runtime import derived_seed
from dirl.train import dist as dist_lib
from dirl.train import precision
from dirl.train import state as state_lib
from dirl.train.models import RunInputs, set_block_size
from dirl.train.optim import build_optimizer, build_scheduler, clip_and_step
from dirl.train.setup import run_scope, setup
from dirl.train.sft.config import SFTConfig, held_out_source
from dirl.train.sft.data import SFTBatch, SFTLoader, tokenize_rows
from dirl.train.plots import plot_run
from dirl.train.tracking import MetricsLogger, format_metrics

# ---------------------------------------------------------------- 1. setup


def load_examples(cfg: SFTConfig, tokenizer, block_size: int, rows: list[dict] | None = None):
    """Tokenised examples of ``rows`` (in memory) or of the config's data source."""
    source = cfg.data.source if rows is None else rows
    rows = load_sft_rows(source, split=cfg.data.split, limit=cfg.data.limit, seed=cfg.seed)
    return tokenize_rows(rows, tokenizer, cfg.data, block_size,
                         source=cfg.data.source if source is cfg.data.source else "train_dataset")


# ---------------------------------------------------------------- 3. one step


def compute_loss(run: "SFTRun", batch: SFTBatch, noise: NoiseDraw) -> tuple[torch.Tensor, dict]:
    """The objective of one micro-batch (a seam the NaN-guard test patches)."""
    with precision.autocast(run.cfg.compute, run.device, sharded=dist_lib.is_sharded(run.model)):
        if run.cfg.objective == "autoregressive":
            return sft_autoregressive(run.model, batch, attn_impl=run.attn_impl)
        return sft_nelbo(run.model, batch, noise, run.tokenizer.mask_token_id, attn_impl=run.attn_impl)


def _samples_with_response(batch: SFTBatch) -> int:
    """The NELBO's normaliser: samples of the batch with at least one response token."""
    num_samples = int(batch.sample_ids.max()) + 1 if batch.sample_ids.numel() else 0
    return int((response_counts(batch.response_mask, batch.sample_ids, num_samples) > 0).sum())


def local_share(batch: SFTBatch, noise: NoiseDraw) -> tuple[SFTBatch, NoiseDraw, float]:
    """This rank's contiguous rows of a global batch, their masks, and its weight
    (its samples / the global batch's samples: local mean -> share of the global mean)."""
    world = dist_lib.world_size()
    if world == 1:
        return batch, noise, 1.0
    rows = torch.tensor_split(torch.arange(batch.input_ids.shape[0]), world)[dist_lib.rank()]
    part = slice(int(rows[0]), int(rows[-1]) + 1)
    doc_ids = batch.doc_ids[part]
    local = SFTBatch(batch.input_ids[part], batch.position_ids[part], doc_ids, batch.response_mask[part],
                     batch.sample_ids[part], num_examples=int(batch.sample_ids[part].unique().gt(-1).sum()),
                     num_tokens=int((doc_ids >= 0).sum()))
    weight = _samples_with_response(local) / max(1, _samples_with_response(batch))
    return local, NoiseDraw(noise.masked[:, part], noise.mask_prob[:, part]), weight


def train_step(ctx: "SFTRun") -> dict:
    """``grad_accum`` micro-batches, then one guarded optimizer step."""
    cfg = ctx.cfg
    lr = ctx.scheduler.get_last_lr()[0]
    total_loss, num_tokens, num_positions = 0.0, 0, 0
    num_streams = 1 if cfg.objective == "autoregressive" else 3 if cfg.complementary_masks else 2  # [x_t^1 ; (x_t^2 ;) x_0]
    for micro in range(cfg.optim.grad_accum):
        batch = ctx.loader.next_batch()  # the global batch: same cursor, same masks on every rank
        noise = draw_noise(batch.response_mask, batch.sample_ids, ctx.noise_gen, cfg.noise_eps,
                           cfg.complementary_masks)
        num_tokens += batch.num_tokens
        num_positions += batch.input_ids.numel() * num_streams
        local, local_noise, weight = local_share(batch, noise)
        with dist_lib.grad_sync(ctx.model, enabled=micro == cfg.optim.grad_accum - 1):
            loss, _ = compute_loss(ctx, local.to(ctx.device), local_noise)
            # x * 1.0 is exact: one rank computes exactly what it always did.
            (loss * (weight * dist_lib.world_size()) / cfg.optim.grad_accum).backward()
        total_loss += float(loss.detach()) * weight / cfg.optim.grad_accum
    total_loss = dist_lib.all_reduce_sum([total_loss])[0]
    grad_norm, skipped = clip_and_step(ctx.model, ctx.optimizer, ctx.scheduler, cfg.optim)
    return {"loss": total_loss, "learning_rate": lr, "grad_norm": grad_norm, "skipped": skipped, "num_tokens": num_tokens,
            "num_positions": num_positions}


# ---------------------------------------------------------------- 4. eval


def held_out_eval(model, tokenizer, cfg: SFTConfig) -> dict:
    """Greedy accuracy on ``eval.limit`` problems of ``eval.data`` (default: the task's test split)
    through the shared eval path; logged as ``eval/accuracy`` and ``eval/mean_reward`` (as in RL)."""
    source = held_out_source(cfg)
    task = task_of(source) or task_of(cfg.data.source)
    rows = load_prompt_rows(source, limit=cfg.eval.limit, seed=cfg.seed)
    reward = cfg.eval_reward or (task.reward if task else DEFAULT_REWARD)
    # One engine call over every question (batch_size = eval.limit), each seeded by its index.
    spec = EvalSpec(reward=reward, prompt_template=cfg.data.prompt_template,
                    batch_size=cfg.eval.limit, sampling=cfg.eval_sampling)
    summary, _ = evaluate_rows(model, tokenizer, rows, spec)
    return held_out_metrics(summary)


# ---------------------------------------------------------------- the run


@dataclass
class SFTRun:
    """Everything the loop mutates, in one place."""

    cfg: SFTConfig
    run_dir: Path
    device: torch.device
    attn_impl: str
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: SFTLoader
    noise_gen: torch.Generator
    step: int = 0
    skipped_steps: int = 0
    window: "_Window" = field(default_factory=lambda: _Window())

    def extra(self) -> dict:
        return {"loader": self.loader.state_dict(), "noise_rng": self.noise_gen.get_state(),
                "skipped_steps": self.skipped_steps, "log_window": self.window.state_dict()}

    def save(self) -> Path:
        trainable = state_lib.Trainable(self.model, self.tokenizer, self.optimizer, self.scheduler)
        return state_lib.save_checkpoint(self.run_dir, self.step, trainable, self.extra(), self.cfg,
                                         keep_last=self.cfg.keep_last)


def build_run(cfg: SFTConfig, resume: str | Path | None = None, inputs: RunInputs | None = None) -> SFTRun:
    """Sections 1-2: model, data, optimizer, schedule; restored from ``resume`` if given."""
    inputs = inputs or RunInputs()

    def prepare(device):
        if cfg.batch_size < dist_lib.world_size():
            raise ValueError(f"batch_size={cfg.batch_size} is the global batch: it must be >= the "
                             f"{dist_lib.world_size()} ranks")

    made = setup(cfg, inputs, prepare)
    device, attn_impl, model, tokenizer = made.device, made.attn_impl, made.model, made.tokenizer
    set_block_size(model, cfg.block_size, cfg.lora)
    if cfg.objective == "autoregressive" and model.arch.logit_shift != 1:
        raise config_lib.ConfigError(f"objective=autoregressive needs a shifted-logit model (the dream family); "
                                     f"{cfg.model} is a {model.arch.family} model, which reads token i at row i")
    context = model.arch.max_position_embeddings
    if cfg.eval.every:
        check_sampling(cfg.eval_sampling, model.arch, "eval_sampling", context, longest_prompt=1)
    if cfg.data.max_length > context:  # packing would never fill a row; no example can be that long
        raise config_lib.ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's context of "
                                     f"{context} tokens")
    examples = load_examples(cfg, tokenizer, model.arch.block_size, inputs.train_rows)  # validates every row
    if cfg.batch_size > len(examples):
        raise config_lib.ConfigError(f"batch_size={cfg.batch_size} is more than the {len(examples)} training examples")
    # Flex compiles per shape: give unpacked batches a fixed length too.
    row_length = cfg.data.max_length if (cfg.pack or attn_impl == "flex") else None
    loader = SFTLoader(examples, cfg.batch_size, tokenizer.pad_token_id, cfg.seed, cfg.pack, row_length)
    model = dist_lib.wrap(model, cfg.dist.strategy, device, mp_policy=precision.fsdp_policy(cfg.compute, device))
    optimizer = build_optimizer(dist_lib.unwrap(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    noise_gen = torch.Generator().manual_seed(derived_seed(cfg.seed, "noise"))
    run = SFTRun(cfg, Path(cfg.out), device, attn_impl, model, tokenizer, optimizer, scheduler, loader, noise_gen)
    if resume:
        checkpoint = state_lib.resolve_resume(resume)
        state = state_lib.load_checkpoint(checkpoint, model, optimizer, scheduler)  # last: restores RNGs
        run.run_dir = checkpoint.parent.parent
        run.step = int(state["step"])
        run.skipped_steps = int(state["extra"]["skipped_steps"])
        loader.load_state_dict(state["extra"]["loader"])
        noise_gen.set_state(state["extra"]["noise_rng"])
        run.window.load_state_dict(state["extra"].get("log_window"))  # the log window continues
    return run


def train_sft(cfg: SFTConfig, resume: str | Path | None = None, inputs: RunInputs | None = None) -> Path:
    """Run (or continue) SFT; returns the run directory. Under torchrun every rank calls it.

    ``inputs`` holds what a Python caller gives besides the config (``dirl.SFTTrainer``)."""
    inputs = inputs or RunInputs()
    with run_scope(cfg, resume):
        return _train(build_run(cfg, resume, inputs), bool(resume), inputs.callbacks)


def _train(run: SFTRun, resumed: bool, callbacks) -> Path:
    """Sections 3-5: the loop (every rank), logging and files (rank 0)."""
    cfg, main = run.cfg, dist_lib.is_main()
    if main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(config_lib.dump(cfg))
    logger = MetricsLogger(run.run_dir, enabled=main, resume_step=run.step if resumed else None,
                           report_to=cfg.report_to, config=config_lib.to_dict(cfg))
    last_step = cfg.last_step()
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not (cfg.progress and main), desc="sft",
               dynamic_ncols=True)
    window = run.window
    saved_at = run.step if resumed else -1
    run.model.train()
    try:
        while run.step < last_step:
            # 3. one optimizer step
            metrics = train_step(run)
            run.step += 1
            run.skipped_steps += int(metrics["skipped"])
            window.add(metrics)
            bar.update(1)
            if main:
                callbacks.on_step_end(run.step, metrics)
            # 4. log, eval, save
            # Not at stop_at_step: the open window is saved and continues in the resumed run.
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                _log(run, logger, bar, window.flush(run.skipped_steps))
            if cfg.eval.every > 0 and run.step % cfg.eval.every == 0 and held_out_source(cfg):
                _log(run, logger, bar, _evaluate(run))
                run.model.train()
            if cfg.save_every > 0 and run.step % cfg.save_every == 0:
                _save(run, callbacks)
                saved_at = run.step
        # 5. the end
        if saved_at != run.step:
            _save(run, callbacks)
        if run.step >= cfg.max_steps:
            state_lib.save_model_dir(run.model, run.tokenizer, run.run_dir / "final")
        if main:
            logger.close()
            plot_run(run.run_dir, "sft")
    finally:
        bar.close()
        logger.close()
    return run.run_dir


def _save(run: SFTRun, callbacks) -> None:
    path = run.save()
    if dist_lib.is_main():
        callbacks.on_save(run.step, path)


def _evaluate(run: SFTRun) -> dict:
    """Held-out accuracy, by rank 0 on the full weights (the others wait at the next collective)."""
    with dist_lib.full_params(run.model):
        if not dist_lib.is_main():
            return {}
        return held_out_eval(dist_lib.unwrap(run.model), run.tokenizer, run.cfg)


class _Window:
    """Averages over the steps since the last log line (saved in checkpoints, so a resumed run
    logs the same averages as a straight one; only ``tokens_per_s`` restarts its clock)."""

    def __init__(self):
        self.losses, self.norms, self.tokens, self.lr, self.start = [], [], 0, 0.0, time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.losses.append(metrics["loss"])
        self.norms.append(metrics["grad_norm"])
        self.tokens += metrics["num_tokens"]
        self.lr = metrics["learning_rate"]

    def flush(self, skipped_steps: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": sum(self.losses) / len(self.losses), "learning_rate": self.lr,
               "grad_norm": sum(self.norms) / len(self.norms), "tokens_per_s": self.tokens / elapsed,
               "skipped_steps": skipped_steps}
        self.__init__()
        return out

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "tokens": self.tokens, "lr": self.lr}

    def load_state_dict(self, state: dict | None) -> None:
        self.__init__()
        if state:
            self.losses, self.norms = list(state["losses"]), list(state["norms"])
            self.tokens, self.lr = int(state["tokens"]), float(state["lr"])


def _log(run: SFTRun, logger: MetricsLogger, bar, metrics: dict) -> None:
    if not dist_lib.is_main():
        return
    logger.log(run.step, metrics)
    line = f"step {run.step}/{run.cfg.max_steps} " + format_metrics(metrics)
    if run.cfg.progress:
        bar.write(line)
    else:
        print(line, flush=True)
