"""DPOTrainer: setup, the training step, eval, checkpoints.

    trainer = DPOTrainer(TrainConfig(...))   # checks options, data and model source; loads no model
    summary = trainer.train()                # warm-up (optional) -> DPO steps -> final eval and save

One optimizer step is `train_step`: micro-batches -> forward -> loss -> backward, then clip, step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastdpo.attention import attention_implementation

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_rank_state,
    read_state,
    remove_partial_checkpoints,
    save_checkpoint,
    save_final_model,
    write_json_atomic,
)
from .config import (
    SAVED_CONFIG,
    ConfigError,
    TrainConfig,
    check,
    check_given,
    loss_config,
    merge_saved,
    read_saved_config,
    resolve,
)
from .data import PairLoader, check_budget, prepare_data, sharded_batches
from .distributed import check_distributed, check_ranks_agree, fused_adamw, make_accelerator, prepare_frozen
from .lock import RunDirLock
from .logs import METRICS, TASK_SUCCESS, RunLog, Window, peak_memory_gb, read_metrics
from .loss import LossFn, attach_head, head_options, sft_nll
from .model import (
    check_layout,
    check_model_source,
    choose_layout,
    frozen_copy,
    load_model,
    load_tokenizer,
    model_limits,
    weight_dtype,
)
from .ref import AdapterReference, ModelReference, Reference, cache_key, default_cache_dir, precompute
from .signals import StopOnSignal
from .task_eval import rule_for, task_success

WARMUP_DIR = "warmup"  # the policy after the supervised warm-up: the starting point of DPO
FINAL_DIR = "final"


def _holding_run_dir(method):
    """A DPOTrainer method that writes to the run directory: outside train() (evaluate() after it,
    say) it takes the directory's lock for its own span, refused if another process holds it."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        was_held = self.lock.held
        main = self.accelerator.is_main_process
        refusal = self._same_on_all_ranks(_refusal(self.lock.acquire) if main and not was_held else "")
        if refusal:
            raise ConfigError(refusal)
        try:
            return method(self, *args, **kwargs)
        finally:
            if not was_held:
                self.lock.release()

    return locked


class DPOTrainer:
    """DPO training of a causal LM with fastdpo's losses, on one process or many (Accelerate)."""

    def __init__(self, cfg: TrainConfig | None = None, *, given: set[str] | None = None) -> None:
        """`given`: with resume=True, the options set explicitly (the command line's flags); the
        others take the run's saved values. None counts every option not at its default as given."""
        cfg = cfg or TrainConfig()
        check_given(cfg)
        saved = read_saved_config(cfg.run_dir) if cfg.resume and cfg.run_dir else None
        if saved is not None:  # --resume continues with the run's own options
            cfg = merge_saved(cfg, saved, given)
        cfg = resolve(cfg)
        check(cfg)
        quiet_libraries()
        self.accelerator = make_accelerator(cfg.grad_accum, cfg.batch_size, cfg.max_grad_norm)
        self.cfg = cfg = dataclasses.replace(cfg, run_dir=self._same_on_all_ranks(cfg.run_dir))
        self.device = self.accelerator.device
        self.autocast = use_autocast(cfg, self.device)
        self.log = RunLog(cfg.run_dir, enabled=self.accelerator.is_main_process, progress_bar=cfg.progress_bar)
        self.lock = RunDirLock(cfg.run_dir)  # held by the main process from its checks to the run's end
        try:
            self._init(cfg)
        except BaseException:
            self.lock.release()  # a refused command leaves the directory free at once
            raise

    def _init(self, cfg: TrainConfig) -> None:
        """__init__'s checks and data, under the run directory's lock."""
        self.resume_from = self._check_run_dir()
        check_distributed(cfg, self.accelerator)
        check_model_source(cfg.model)
        with self.accelerator.main_process_first():  # one download per machine, then the cache
            self.tokenizer = load_tokenizer(cfg)
            self.limits = model_limits(cfg.model, self.tokenizer)
            self.data = prepare_data(cfg, self.tokenizer, self.limits)
        self.layout = choose_layout(cfg, self.device.type, self.log.info)
        if cfg.max_tokens:  # every pair must fit the budget alone (named by file and row if not)
            check_budget(self.data.train, self.layout, cfg.max_tokens, self.data.train_origins)
            check_budget(self.data.eval, self.layout, cfg.max_tokens, self.data.eval_origins)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.loader = PairLoader(self.data.train, cfg.batch_size, world=world, rank=rank, seed=cfg.seed,
                                 pad_id=self.tokenizer.pad_token_id, layout=self.layout, max_tokens=cfg.max_tokens)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.loader.per_epoch / cfg.grad_accum))
        trained = read_state(self.resume_from)["step"] if self.resume_from is not None else 0
        if trained > self.total_steps:
            raise ConfigError(f"--resume: {self.resume_from} has trained {trained} steps, more than the "
                              f"{self.total_steps} asked for; raise --max-steps")
        # A finished run resumed with the same length: nothing to train, evaluate or save again.
        self.finished = self.resume_from is not None and trained == self.total_steps and self._same_on_all_ranks(
            "yes" if any(r.get("event") == "finished" for r in self.log.records_at(trained)) else "") == "yes"
        self.losses = loss_config(cfg)  # built once: the loss, the head's options and the reference mode read it
        self.loss_fn = LossFn(cfg, self.autocast, self.losses)
        # A reference-free loss never reads the reference: do not spend a model copy or a pass on one.
        self.ref_mode = cfg.ref if self.losses.needs_reference else "none"
        self.model = None  # built by setup()
        self._trained = False  # train() runs once: it releases the run directory at its end
        self.attention: str | None = None  # the loaded model's attention implementation
        self.step = 0
        self.accelerator.wait_for_everyone()  # every rank has checked the run dir before any writes to it

    # ------------------------------------------------------------------------------------------
    # Setup: warm-up, policy, reference, optimizer, resume

    def setup(self) -> None:
        """Build the policy, reference, optimizer and schedule (and restore a checkpoint)."""
        if self.model is not None:
            return
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed)
        fresh = self.resume_from is None and not self.restart
        try:
            if self.restart:
                self._start_over()
            self._report_start()
            try:
                self._build()
            except Exception:
                if fresh:
                    self._forget_unstarted_run()
                raise
        except BaseException:
            self.lock.release()  # a failed setup leaves the directory free, as a refused __init__ does
            raise

    def _build(self) -> None:
        """setup's model part: warm-up, policy, reference, optimizer, checkpoint."""
        cfg, acc = self.cfg, self.accelerator
        start = self._warm_up() if cfg.sft_steps else cfg.model
        if start is None:
            return  # interrupted during the warm-up
        model = self._load(start)
        frozen = frozen_copy(model) if self.ref_mode == "copy" else None
        for m in (model, frozen):
            if m is not None:
                attach_head(m, head_options(cfg, self.losses))
        key = self._cache_key(model, start) if self.ref_mode == "precompute" else None
        # The model, its optimizer and schedule go through prepare() together: FSDP2 shards the
        # model and then points the optimizer at the sharded parameters.
        self.model, self.optimizer, self.scheduler = acc.prepare(
            model, *make_optimizer(model, cfg.learning_rate, cfg, self.total_steps, fused=fused_adamw(acc)))
        self.reference = self._make_reference(prepare_frozen(acc, frozen), key)
        self._evaluated_step = -1
        self.window = Window()
        if self.resume_from is not None:
            state = load_checkpoint(acc, self.resume_from)
            self.step = state["step"]
            follow_schedule(self.scheduler)
            self.log.truncate_after(self.step)
            self._recall_eval()
            self._restore_window(state)
            self.log.info(f"resumed from {self.resume_from} at step {self.step}")
        self._saved_step = self.step

    def _restore_window(self, state: dict[str, Any]) -> None:
        """The steps trained since the checkpoint's last log record, so that the next record covers
        them as it would have without the stop. Per rank: only with the same number of processes."""
        mine = read_rank_state(self.resume_from, self.accelerator.process_index)
        if mine is not None and state.get("processes") == self.accelerator.num_processes:
            self.window.restore(mine["window"], self.device)
        elif mine is not None and mine["window"]["steps"]:
            self.log.info(f"resumed on {self.accelerator.num_processes} processes, saved on {state.get('processes')}: "
                          f"the next log record covers only the steps after step {self.step}")

    def _recall_eval(self) -> None:
        """After a resume: an eval logged at the checkpoint's step (a run stopped between its final
        eval and its final save, say) is not run and logged again."""
        # (only an eval of the same eval set: --max-eval-pairs, --eval-split and the task prompts may
        # change on resume)
        evals = [r for r in self.log.records_at(self.step) if "eval_loss" in r and r.get("eval_set") == self._eval_set]
        if self._same_on_all_ranks("yes" if evals else "") == "yes":
            self._evaluated_step = self.step
            self.last_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "eval_set")} if evals else {}

    def _load(self, source: str):
        """The model from `source`, checked against this run's batch layout."""
        model = load_model(source, self.cfg, self.tokenizer, weight_dtype(self.cfg, self.device.type == "cuda"))
        check_layout(model, self.layout)
        if self.attention is None:
            self.attention = attention_implementation(model.config)
            self.log.info(f"attention: {self.attention} ({self.layout} batches)")
        return model

    def _make_reference(self, frozen, key: str | None) -> Reference:
        cfg = self.cfg
        if self.ref_mode == "copy":
            return ModelReference(frozen, self.autocast)
        if self.ref_mode == "adapter":
            return AdapterReference(self.model, self.autocast)
        if self.ref_mode == "precompute":
            cache = Path(cfg.ref_cache_dir or default_cache_dir()) / f"{key}.pt"
            ref = precompute(self.model, self.accelerator, self._splits(), cache, batch_size=cfg.batch_size,
                             pad_id=self.tokenizer.pad_token_id, autocast=self.autocast, layout=self.layout,
                             max_tokens=cfg.max_tokens)
            self.log.info(f"reference log-probs {ref.origin}")
            return ref
        return Reference()

    def _cache_key(self, model, start: str) -> str:
        """The reference cache's key, from the main process's weights (under FSDP's low-memory
        loading the other ranks hold empty ones until prepare() broadcasts them)."""
        key = cache_key(model, self._splits(), self._ref_settings(start)) if self.accelerator.is_main_process else ""
        return self._same_on_all_ranks(key)

    def _splits(self) -> dict[str, list]:
        return {"train": self.data.train, "eval": self.data.eval}

    def _ref_settings(self, start: str) -> dict[str, Any]:
        import fastdpo

        return {"model": start, "autocast": self.autocast, "linear": self.cfg.loss_impl == "fused_linear",
                "fastdpo": fastdpo.__version__}

    def _warm_up(self) -> str | None:
        """Supervised warm-up on the chosen answers; its result is saved under run_dir/warmup and
        is the starting policy (and so the reference) of DPO. Reused when it is already there."""
        cfg, acc = self.cfg, self.accelerator
        snapshot = Path(cfg.run_dir) / WARMUP_DIR
        if (snapshot / "config.json").is_file():
            return str(snapshot)
        model = self._load(cfg.model)
        attach_head(model, head_options(cfg, self.losses))
        model, optimizer, scheduler = acc.prepare(
            model, *make_optimizer(model, cfg.sft_learning_rate, cfg, cfg.sft_steps, fused=fused_adamw(acc)))
        self.log.start_bar(cfg.sft_steps, 0, "warm-up")
        with StopOnSignal(self.log.info, "stopping the warm-up after this step (nothing is saved before DPO "
                          "starts; Ctrl-C again quits at once)") as stop:
            for step in range(cfg.sft_steps):
                if stop.requested(acc):
                    self.log.close_bar()
                    self.log.info(f"interrupted during the warm-up; nothing saved. Start over with: "
                                  f"{self.resume_command()}")
                    return None
                loss = self._sft_step(model, optimizer, scheduler, step)
                if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.sft_steps:
                    self.log.write({"step": 0, "sft_step": step + 1, "sft_loss": loss,
                                    "lr": scheduler.get_last_lr()[0]})
                self.log.advance({"sft_loss": loss})
        self.log.close_bar()
        save_final_model(acc, model, self.tokenizer, snapshot)
        acc.free_memory()  # forget the warm-up's wrapped model and optimizer
        return str(snapshot)

    def _sft_step(self, model, optimizer, scheduler, step: int) -> float:
        """One warm-up step; returns the token-mean NLL over the global batch."""
        cfg, acc = self.cfg, self.accelerator
        model.train()
        loss = 0.0
        for micro in range(cfg.grad_accum):
            batch = self.loader.batch(step * cfg.grad_accum + micro, chosen_only=True).to(self.device)
            with acc.accumulate(model):
                nll, tokens = sft_nll(model, batch, self.autocast)
                # Divide by the tokens of the whole global micro-batch, times the world size that
                # DDP's gradient average divides out again: the token mean of a single process.
                tokens = self._sum(tokens).clamp(min=1)
                acc.backward(nll / tokens * acc.num_processes)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss += (self._sum(nll.detach()) / tokens).item() / cfg.grad_accum
        scheduler.step()
        return loss

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the processes."""
        return self.accelerator.reduce(x, "sum") if self.accelerator.num_processes > 1 else x

    # ------------------------------------------------------------------------------------------
    # Training

    def train(self) -> dict[str, Any]:
        """Run to --max-steps (or until Ctrl-C / SIGTERM, which saves a checkpoint first)."""
        if self._trained:
            raise RuntimeError("this DPOTrainer's train() has ended and its run directory was released (another "
                               "command may have continued the run since): continue with a new "
                               "DPOTrainer(TrainConfig(..., resume=True))")
        self._trained = True
        t0 = time.perf_counter()
        try:
            with cpu_threads(self.cfg.cpu_threads if self.device.type == "cpu" else 0):
                summary = self._train()
        finally:
            self.lock.release()  # the run directory is free for a --resume from here on
        summary["seconds"] = time.perf_counter() - t0
        if not summary["interrupted"] and not summary.get("already_finished"):
            for line in summary_lines(summary, self.cfg.run_dir, self.log.task_success()):
                self.log.info(line)
        return summary

    def _train(self) -> dict[str, Any]:
        if self.finished:
            final = Path(self.cfg.run_dir) / FINAL_DIR
            self.log.info(f"{self.cfg.run_dir} has finished its {self.total_steps} steps (final model: {final}); "
                          "nothing to do: raise --max-steps to train further")
            return {"step": self.total_steps, "interrupted": False, "already_finished": True, "final_model": str(final)}
        self.setup()
        if self.model is None:
            return {"step": 0, "interrupted": True}
        if self.step == 0:
            self._task_eval()  # the starting policy's success, the baseline DPO must beat
        interrupted = False
        self.log.start_bar(self.total_steps, self.step, "dpo")
        with StopOnSignal(self.log.info, "stopping after this step to save a checkpoint (Ctrl-C again quits "
                          "at once, keeping the last complete checkpoint)") as stop:
            while self.step < self.total_steps and not (interrupted := stop.requested(self.accelerator)):
                t = time.perf_counter()
                stats = self.train_step()
                self.step += 1
                self.window.add(stats, time.perf_counter() - t)
                self._after_step()
            self.log.close_bar()
            if interrupted:  # saved under this handler: a second Ctrl-C quits at once, as promised
                return self._finish(interrupted)
        return self._finish(interrupted)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over --grad-accum micro-batches; returns their mean metrics."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        tokens = real_tokens = 0
        first = self.step * cfg.grad_accum
        local_pairs = sum(len(self.loader.pairs_of(first + k)) for k in range(cfg.grad_accum))
        global_pairs = sum(self.loader.global_pairs(first + k) for k in range(cfg.grad_accum))
        # NLL terms: one token mean over the whole step, as one process with the global batch
        # computes it (a per-micro-batch mean averaged over ranks would weigh tokens unequally).
        nll_tokens = sum(self.loader.global_chosen_tokens(first + k) for k in range(cfg.grad_accum)) \
            if self.losses.has_nll else None
        for micro in range(cfg.grad_accum):
            batch = self.loader.batch(first + micro).to(self.device)
            ref_logps = self.reference.logps(batch, "train")
            # accumulate(): gradients sync, and the optimizer steps, on the last micro-batch only;
            # backward() divides the loss by --grad-accum and DDP averages over ranks. The weight
            # undoes both and gives each pair the same share of the step (1 unless --max-tokens
            # makes micro-batches of different sizes).
            weight = batch.pairs * cfg.grad_accum * acc.num_processes / global_pairs
            with acc.accumulate(self.model):
                # `weight` scales the NLL term too: divide by the step's tokens over that weight.
                share = None if nll_tokens is None else nll_tokens * batch.pairs / global_pairs
                loss, metrics = self.loss_fn(self.model, batch, ref_logps, nll_tokens=share)
                acc.backward(loss * weight)
                if acc.sync_gradients:  # (under DeepSpeed its engine clips; this reads its norm)
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for name, value in {"loss": loss.detach(), **metrics}.items():
                totals[name] = totals.get(name, 0.0) + value.float() * batch.pairs / local_pairs
            tokens += batch.tokens
            real_tokens += batch.real_tokens
        self.scheduler.step()
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor (a partial of each shard)
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(math.nan if grad_norm is None else grad_norm, dtype=torch.float32)
        return {**totals, "grad_norm": grad_norm, "tokens": tokens, "real_tokens": real_tokens}

    def _after_step(self) -> None:
        """Log, evaluate and save where due. Between those steps nothing here reads a device value,
        so the host queues the next step while the device still runs this one."""
        cfg = self.cfg
        logging = self.step % cfg.logging_steps == 0 or self.step == self.total_steps
        evaluating = bool(self.data.eval and cfg.eval_steps and self.step % cfg.eval_steps == 0)
        saving = bool(cfg.save_steps and self.step % cfg.save_steps == 0)
        if logging or evaluating or saving:
            self.window.settle(self.device)  # the queued steps' device time is theirs, not the eval's
        postfix = None
        if logging:
            check_ranks_agree(self.accelerator, self.model, self.step)
            record = self.window.flush(self.accelerator)
            self.log.write({"step": self.step, "epoch": self.loader.epoch_of(self.step * cfg.grad_accum),
                            "lr": self.scheduler.get_last_lr()[0], **record,
                            "peak_memory_gb": peak_memory_gb(self.device)})
            postfix = {"loss": record["loss"], "acc": record.get("rewards/accuracies", math.nan),
                       "tok/s": record["tokens/s"]}
        self.log.advance(postfix)  # the bar's numbers are those of the latest log line
        if evaluating:
            self.evaluate()
        if saving:
            self.save()

    @_holding_run_dir
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and TRL metrics over every eval pair (pair-weighted, across all ranks)."""
        acc = self.accelerator
        self.model.eval()
        sums: torch.Tensor | float = 0.0
        names: list[str] = []
        pairs, tokens = len(self.data.eval), sum(len(pair.chosen) for pair in self.data.eval)
        for batch, n in sharded_batches(self.data.eval, self.cfg.batch_size, world=acc.num_processes,
                                        rank=acc.process_index, pad_id=self.tokenizer.pad_token_id,
                                        layout=self.layout, max_tokens=self.cfg.max_tokens):
            batch = batch.to(self.device)
            # NLL terms: one token mean over the eval set (batch means are weighted by pairs below)
            loss, metrics = self.loss_fn(self.model, batch, self.reference.logps(batch, "eval"),
                                         nll_tokens=tokens * max(n, 1) / pairs)
            names = ["loss", *sorted(metrics)]
            values = torch.stack([loss.float(), *(metrics[k].float() for k in names[1:]), torch.ones_like(loss)])
            sums = sums + values * n  # batch means weighted by pairs; the last slot counts pairs
        self.model.train()
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
        sums = sums.tolist()
        record = {f"eval_{k}": v / sums[-1] for k, v in zip(names, sums[:-1])}
        success = self._task_success()
        if success is not None:
            record[TASK_SUCCESS] = success
        self.log.write({"step": self.step, **record, "eval_set": self._eval_set})
        self.log.info(f"step {self.step}: eval loss {record['eval_loss']:.4f}, reward accuracy "
                      f"{record.get('eval_rewards/accuracies', math.nan):.3f}, margin "
                      f"{record.get('eval_rewards/margins', math.nan):.3f}"
                      + ("" if success is None else f", task success {success:.2f}"))
        self._evaluated_step = self.step
        self.last_eval = record
        return record

    @functools.cached_property
    def _eval_set(self) -> str:
        """What an eval measured: a hash of the eval pairs' tokens and the task prompts' count."""
        import hashlib

        h = hashlib.sha256(str(self.cfg.task_eval_prompts).encode())
        for pair in self.data.eval:
            h.update(repr((pair.prompt, pair.chosen, pair.rejected)).encode())
        return h.hexdigest()[:16]

    def _task_success(self) -> float | None:
        """Greedy answers to the first --task-eval-prompts eval prompts, checked by the task's rule."""
        rule = rule_for(self.cfg.dataset)
        if rule is None or not self.cfg.task_eval_prompts or not self.data.eval:
            return None
        prompts = [pair.prompt for pair in self.data.eval[:self.cfg.task_eval_prompts]]
        return task_success(self.model, self.tokenizer, prompts, rule, device=self.device, autocast=self.autocast,
                            max_positions=self.limits.positions)

    def _task_eval(self) -> None:
        """Log task success alone (before the first DPO step)."""
        success = self._task_success()
        if success is not None:
            self.log.write({"step": self.step, TASK_SUCCESS: success})
            self.log.info(f"step {self.step}: task success {success:.2f} (greedy answers to "
                          f"{min(self.cfg.task_eval_prompts, len(self.data.eval))} held-out prompts)")

    @_holding_run_dir
    def save(self) -> Path:
        """Checkpoint now (atomic; see checkpoint.py)."""
        cfg = self.cfg
        state = {"step": self.step, "micro_batches": self.step * cfg.grad_accum,
                 "global_micro_batch": self.loader.global_batch, "grad_accum": cfg.grad_accum,
                 "total_steps": self.total_steps, "processes": self.accelerator.num_processes, "config": cfg.to_dict()}
        path = save_checkpoint(self.accelerator, cfg.run_dir, state, cfg.save_total_limit,
                               rank_state={"window": self.window.state()})
        self._saved_step = self.step
        return path

    def _finish(self, interrupted: bool) -> dict[str, Any]:
        summary: dict[str, Any] = {"step": self.step, "interrupted": interrupted}
        if self._saved_step != self.step or interrupted:
            summary["checkpoint"] = str(self.save())
        if interrupted:
            self.log.info(f"interrupted at step {self.step}; checkpoint saved to {summary['checkpoint']}; "
                          f"continue with: {self.resume_command()}")
            return summary
        if self.data.eval and self._evaluated_step != self.step:
            self.evaluate()
        summary["eval"] = getattr(self, "last_eval", {})
        summary["final_model"] = str(save_final_model(self.accelerator, self.model, self.tokenizer,
                                                      Path(self.cfg.run_dir) / FINAL_DIR))
        self.log.write({"step": self.step, "event": "finished", "final_model": summary["final_model"]})
        self.log.info(f"model saved to {summary['final_model']}")
        return summary

    def _forget_unstarted_run(self) -> None:
        """A fresh run that failed while setting up (a model that refuses its LoRA targets, say) and
        wrote nothing but its config and start record: remove those, so that the directory takes a
        corrected command rather than insisting on --resume with the failing options. A finished
        warm-up or a checkpoint is kept, with the config that made it."""
        run_dir = Path(self.cfg.run_dir)
        if not self.accelerator.is_main_process or (run_dir / WARMUP_DIR).exists() or latest_checkpoint(run_dir):
            return
        for name in (SAVED_CONFIG, METRICS):
            (run_dir / name).unlink(missing_ok=True)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()

    def _start_over(self) -> None:
        """--resume of a run stopped before its first checkpoint: begin again in its directory,
        keeping a finished warm-up (written whole or not at all, see save_final_model)."""
        warmed = (Path(self.cfg.run_dir) / WARMUP_DIR / "config.json").is_file()
        self.log.info(f"--resume: {self.cfg.run_dir} has no checkpoint yet; starting the run over in the same "
                      "directory" + (", from its finished warm-up" if warmed else ""))
        if self.accelerator.is_main_process:
            self.log.restart(keep_warmup=warmed)
            remove_partial_checkpoints(self.cfg.run_dir)
        self.accelerator.wait_for_everyone()

    def resume_command(self) -> str:
        """The command that continues this run (it reads the run's saved options)."""
        import shlex

        return f"fastdpo train --resume --run-dir {shlex.quote(self.cfg.run_dir)}"

    # ------------------------------------------------------------------------------------------
    # Start-up checks and reports

    def _check_run_dir(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh start; refuses to mix two runs.

        Only reads: nothing in the run directory is written until every check has passed."""
        cfg = self.cfg
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {cfg.run_dir} is a file, not a directory")
        # Locked before reading (another process may be writing this run), by the main process; a
        # refusal there is every rank's, so that no rank goes on to wait for the others.
        main = self.accelerator.is_main_process
        refusal = self._same_on_all_ranks(_refusal(self.lock.acquire) if main and run_dir.is_dir() else "")
        if refusal:
            raise ConfigError(refusal)
        latest = latest_checkpoint(run_dir)
        self.restart = False
        if not cfg.resume:
            if holds_run(run_dir):
                raise ConfigError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, "
                                  "or choose another --run-dir")
            return None
        if (run_dir / METRICS).is_file():
            read_metrics(run_dir)  # a damaged line is refused now, not when resuming rewrites the file
        if latest is None:
            if not (run_dir / SAVED_CONFIG).is_file():
                raise ConfigError(f"--resume: {cfg.run_dir} holds no run to continue (no {SAVED_CONFIG})")
            self.restart = True  # stopped before its first checkpoint: start over, same directory
            return None
        state = read_state(latest)
        global_batch = cfg.batch_size * self.accelerator.num_processes
        if (state["global_micro_batch"], state["grad_accum"]) != (global_batch, cfg.grad_accum):
            raise ConfigError(f"--resume: {latest} was trained with {state['global_micro_batch']} pairs per "
                              f"micro-batch x {state['grad_accum']} accumulation, now {global_batch} x "
                              f"{cfg.grad_accum}; resume with the same global batch")
        return latest

    def _claim_run_dir(self) -> None:
        """Create the run directory of a fresh run and lock it (a directory that already existed was
        locked by _check_run_dir). Checked again under the lock: a run started by another command
        since this one's checks must not be mixed into."""
        run_dir = Path(self.cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        was_held = self.lock.held
        self.lock.acquire()
        if not was_held and self.resume_from is None and not self.restart and holds_run(run_dir):
            raise ConfigError(f"{self.cfg.run_dir} already holds a run (started by another command since this "
                              "one's checks): pass --resume to continue it, or choose another --run-dir")

    def _report_start(self) -> None:
        cfg, acc, data = self.cfg, self.accelerator, self.data
        global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
        facts = {"processes": acc.num_processes, "per_device_batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
                 "global_batch": global_batch, "total_steps": self.total_steps, "train_pairs": len(data.train),
                 "eval_pairs": len(data.eval), "skipped_invalid": data.skipped_invalid,
                 "dropped_too_long": data.dropped_too_long, "device": str(self.device), "autocast_bf16": self.autocast,
                 "layout": self.layout, "max_tokens": cfg.max_tokens}
        # Claimed on the main process; its refusal is every rank's (the others would wait for it)
        refusal = self._same_on_all_ranks(_refusal(self._claim_run_dir) if acc.is_main_process else "")
        if refusal:
            raise ConfigError(refusal)
        if acc.is_main_process:
            write_json_atomic(Path(cfg.run_dir) / "config.json", cfg.to_dict())
        self.log.write({"step": self.step if self.resume_from is None else read_state(self.resume_from)["step"],
                        "event": "resume" if self.resume_from else "start", **facts})
        per_device = f"up to {cfg.max_tokens} tokens" if cfg.max_tokens else f"{cfg.batch_size} pairs"
        global_size = f"{cfg.max_tokens * acc.num_processes * cfg.grad_accum} tokens" if cfg.max_tokens else \
            f"{global_batch} pairs"
        self.log.info(f"fastdpo: {acc.num_processes} process(es) on {self.device}, {per_device} per device "
                      f"x {acc.num_processes} x {cfg.grad_accum} accumulation = global batch {global_size}; "
                      f"{self.total_steps} steps; {len(data.train)} train / {len(data.eval)} eval pairs; "
                      f"{self.layout} batches; "
                      f"run dir {cfg.run_dir}")
        if self.ref_mode != cfg.ref:
            self.log.info(f"--loss-type {cfg.loss_type} reads no reference: --ref {cfg.ref} is not used")
        if data.skipped_invalid or data.dropped_too_long:
            self.log.info(f"skipped {data.skipped_invalid} malformed rows; dropped {data.dropped_too_long} pairs whose "
                          f"prompt fills --max-length {cfg.max_length}")

    def _same_on_all_ranks(self, value: str) -> str:
        """The main process's value (the default run_dir holds a timestamp)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def _refusal(action) -> str:
    """Run `action`; the message of the ConfigError it raises, or "" (to share across ranks)."""
    try:
        action()
    except ConfigError as e:
        return str(e)
    return ""


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (the start of) a run: a checkpoint, a saved config or metrics."""
    return latest_checkpoint(run_dir) is not None or any((run_dir / n).exists() for n in (SAVED_CONFIG, METRICS))


@contextmanager
def cpu_threads(n: int):
    """Run with `n` torch threads (0: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_libraries() -> None:
    """Hide transformers' progress bars for every save and load, accelerate's note about tied
    weights (saved once, tied again on load) at every checkpoint, and DeepSpeed's note that it
    found no GPU (transformers imports DeepSpeed wherever it is installed, so a CPU run printed it
    at its first save)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_no_cpu_accelerator_note)  # the same object: added once


def _no_cpu_accelerator_note(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def use_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.mixed_precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.mixed_precision == "bf16"


def follow_schedule(scheduler) -> None:
    """Set the optimizer's learning rate to the schedule's value at the restored step.

    A checkpoint restores the optimizer's last learning rate and the scheduler's step count, but
    the schedule itself is rebuilt from this run's total steps: when --max-steps was raised on
    resume, the next step must use the new schedule's rate, not the old schedule's last one. For
    an unchanged total this recomputes the same value (the same float operations)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler
    inner.last_epoch -= 1
    inner.step()


def make_optimizer(model, lr: float, cfg: TrainConfig, steps: int, fused: bool = False):
    """AdamW over the trainable parameters, with linear warm-up then the chosen decay. `fused`:
    torch's one-kernel AdamW (the parameters will live on a GPU)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=round(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimizer, scheduler


def summary_lines(summary: dict[str, Any], run_dir: str, task_success: list[tuple[int, float]]) -> list[str]:
    """The end-of-run report: time, steps, final eval, where everything is, and the plot command."""
    import shlex

    minutes, seconds = divmod(round(summary["seconds"]), 60)
    lines = [f"done: {summary['step']} DPO steps in {minutes}m {seconds:02d}s (wall time, set-up and warm-up included)"]
    ev = summary.get("eval") or {}
    if ev:
        lines.append(f"  final eval:  loss {ev['eval_loss']:.4f}, reward accuracy "
                     f"{ev.get('eval_rewards/accuracies', math.nan):.3f}, margin {ev.get('eval_rewards/margins', math.nan):.3f}")
    if task_success:
        (s0, first), (s1, last) = task_success[0], task_success[-1]
        lines.append(f"  task success (greedy answers checked by the task's rule): {first:.2f} at step {s0} "
                     f"-> {last:.2f} at step {s1}")
    run = Path(run_dir)
    latest = latest_checkpoint(run)
    lines += [f"  metrics:     {run / METRICS}",
              f"  checkpoints: {run / 'checkpoints'}" + (f" (latest {latest.name})" if latest else ""),
              f"  final model: {summary.get('final_model', '-')}",
              f"  plot:        fastdpo plot {shlex.quote(run_dir)}"]
    return lines
