"""The training engine shared by ``upcycle pretrain`` and ``upcycle finetune`` (one loop, on Accelerate).

What differs between the two (data, loss, metrics, evaluation) is a small task object
(:mod:`upcycle.training.task`); everything else lives here once: the run folder, optimizer and LR
schedule, gradient accumulation and clipping, non-finite checks, SIGTERM/SIGINT, checkpoints and exact
resume, metrics.jsonl / TensorBoard / W&B, the progress display, ``best/`` and ``final/``.

One optimizer step = ``grad_accum`` micro-batches per process, each a forward whose loss is the task
loss plus, for MoE models, the config-weighted auxiliary losses of every MoE layer. That single loss goes
through ``accelerator.backward``, which divides it by the accumulation steps, and DDP averages gradients
over processes, so the auxiliary losses are scaled exactly like the task loss: W processes × A
micro-batches give the gradient of the mean loss over the W·A micro-batches, the same as one process with
W·A micro-batches (tests/training/test_distributed.py checks this for both commands).

Per step, one all-reduce carries the losses, the metric counts and the stop flag, so every process agrees
on non-finite steps and on SIGTERM; per log interval, one more carries the routing counts.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle.config import UserError
from upcycle.evaluation.lm import moe_layers_of, routing_summary
from upcycle.training import checkpoint as ckpt
from upcycle.training.memory import keep_freed_memory
from upcycle.training.reporting import Display, MetricsLog, tracker_scalars
from upcycle.training.rundir import RunFolder, best_step, on_main, write_best
from upcycle.training.schedule import make_scheduler
from upcycle.training.signals import StopRequest
from upcycle.training.task import Task

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class NonFiniteError(UserError):
    """A non-finite loss or gradient norm stopped the run (without ``--skip-nonfinite``)."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; stopped without saving ({kept}). Resume with "
            "--resume, perhaps with a lower --lr or --clip, or pass --skip-nonfinite to skip such steps"
        )


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_dir: Path | None = None
    stopped_by: int | None = None
    """Signal number that stopped the run early (after saving), or None."""
    skipped_nonfinite: int = 0
    documents_read: int = 0
    """Training documents this process read in this session (pretraining; resume reads only unconsumed
    ones)."""
    resumed_from: Path | None = None
    last_eval: dict | None = None
    checkpoints: list[Path] = field(default_factory=list)
    best: dict | None = None
    """{"step", "value"} of the best evaluation so far (fine-tuning: mean validation accuracy)."""
    best_dir: Path | None = None


#: The result of ``pretrain`` (the same fields as every training run's).
PretrainResult = TrainResult


# --------------------------------------------------------------------------- model and optimizer


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm gains are not decayed, as in GPT-2 and
    nanoGPT), fused where PyTorch supports it (CPU and CUDA since 2.4; bitwise deterministic). Frozen
    parameters (``requires_grad=False``) get no optimizer state."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() lists tied weights once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def clip_gradients(accelerator, model, clip: float) -> torch.Tensor | None:
    """Global gradient norm before clipping (clip ≤ 0: measured, not clipped); None under DeepSpeed,
    which clips inside its engine."""
    return accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))


def parallelism(accelerator) -> str:
    kind = accelerator.distributed_type.value
    return "single process" if kind == "NO" else f"{kind} × {accelerator.num_processes} processes"


# --------------------------------------------------------------------------- entry point


def train(task: Task, *, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run ``task`` to ``task.total_steps()`` optimizer steps; see the module docstring.

    ``on_step(step, info)`` is called after every optimizer step (notebooks, tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cfg = task.cfg
    cfg.validate()
    cfg.check_runnable()
    if cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb needs the wandb package: pip install 'upcycle[wandb]'")
    run_dir = Path(cfg.out).expanduser()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=_PRECISION[cfg.precision],
        log_with=[t for t, on in (("tensorboard", cfg.tensorboard), ("wandb", cfg.wandb)) if on] or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    display = Display(1, 0, cfg.progress, enabled=accelerator.is_main_process)
    try:
        return _Session(task, accelerator, display, on_step).run()
    finally:
        display.close()
        accelerator.end_training()
        if accelerator.num_processes == 1:
            # Accelerate's state is a process-wide singleton: reset it so a later call (a notebook, a test)
            # can use another precision or accumulation.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()


class _Session:
    """One invocation of a training command: set up, train, finish. Each phase is a method."""

    def __init__(self, task: Task, accelerator, display: Display, on_step):
        self.task, self.cfg, self.acc = task, task.cfg, accelerator
        self.display, self.on_step = display, on_step
        self.main = accelerator.is_main_process
        self.W, self.rank = accelerator.num_processes, accelerator.process_index
        self.run_dir = Path(self.cfg.out).expanduser()
        self.step = self.tokens = self.skipped = 0
        self.steps_this_session = 0
        self.best: dict | None = None
        """{"step", "value"} of the best evaluation (tasks with a select_key), and its record."""
        self.best_eval: dict | None = None
        self.last_saved: Path | None = None
        self.last_saved_step = -1

    def run(self) -> TrainResult:
        task = self.task
        self.folder = RunFolder(self.cfg, task.command, task.run_files, task.fixed_on_resume)
        self.plan = on_main(self.acc, self.folder.plan)
        for line in self.plan.warnings:
            self.display.warn(line)
        self.resume_from = Path(self.plan.resume) if self.plan.resume else None
        if self.cfg.resume and self.resume_from is None:
            self.display.print(
                f"no usable checkpoint in {self.run_dir / ckpt.CHECKPOINTS}: starting from step 0"
            )
        try:
            self._setup()
            self._start()
            self._loop()
            if self.result.stopped_by is None:
                self._finish()
            return self.result
        except BaseException:
            # A fresh run that fails before completing a step (no tokenizer, bad data, a too long
            # --seq-len, Ctrl-C while loading) leaves nothing behind: the corrected command must not be
            # refused as "holds a previous run" (issue 11).
            if self.steps_this_session == 0 and self.main:
                self.folder.discard(self.plan)
            raise
        finally:
            task.close()
            if hasattr(self, "result"):
                self.result.documents_read = getattr(task, "documents_read", 0)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Model, tokenizer and data (all may fail: nothing is written before them), optimizer, schedule,
        Accelerate, the checkpoint's state; then the run folder is written."""
        from accelerate.utils import set_seed

        task, acc = self.task, self.acc
        task.check_sources()
        # Seeding first makes a fresh head's (or a preset's) initialisation reproducible; on resume, the
        # RNG states saved with the checkpoint are restored below and replace this.
        set_seed(self.cfg.seed)
        model, self.tokenizer = task.load(self.resume_from)
        task.prepare_data(acc, self.tokenizer, model)
        self.total = task.total_steps()
        self.display.set_total(self.total)
        model.train()
        optimizer = make_optimizer(model, self.cfg)
        self.scheduler = make_scheduler(optimizer, **task.schedule(self.total))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The scheduler is not prepared: Accelerate would step it once per process per optimizer step.
        acc.register_for_checkpointing(self.scheduler)
        # The model is saved as a Hugging Face folder beside training_state/; keep Accelerate from writing
        # (and reading) a second copy of the weights there.
        acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        acc.register_load_state_pre_hook(lambda models, inp: models.clear())
        self._restore()
        on_main(acc, lambda: self.folder.commit(self.plan, self.cfg.resolved().to_dict()))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)
        if self.cfg.resume:
            # Records written after the checkpoint (or all, when no checkpoint was usable) are redone.
            self.metrics.truncate_after(self.step if self.resume_from is not None else -1)
        self._start_trackers()
        self.result = TrainResult(
            self.run_dir,
            self.step,
            self.tokens,
            resumed_from=self.resume_from,
            skipped_nonfinite=self.skipped,
        )
        self.result.best = self.best

    def _restore(self) -> None:
        if self.resume_from is None:
            return
        state_dir = self.resume_from / ckpt.STATE_DIR
        self.acc.load_state(str(state_dir))
        state = ckpt.read_trainer_state(self.resume_from)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped = int(state.get("skipped_nonfinite", 0))
        self.best, self.best_eval = state.get("best"), state.get("best_eval")
        self.task.restore(state_dir)
        self.last_saved, self.last_saved_step = self.resume_from, self.step

    def _start_trackers(self) -> None:
        acc = self.acc
        if not acc.log_with:
            return
        # The resolved options are recorded once per run (a resume must not add another hparams run).
        config = None
        if self.step == 0 and self.plan.fresh:
            config = {
                k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in self.task.tracker_config().items()
                if v is not None
            }
        init_kwargs = {
            "tensorboard": {"purge_step": self.step} if self.cfg.resume else {},
            "wandb": {
                "id": self.plan.run_id,
                "resume": "allow",
                "name": self.run_dir.name,
                "dir": str(self.run_dir),
            },
        }
        acc.init_trackers(self.cfg.wandb_project, config=config, init_kwargs=init_kwargs)

    def _start(self) -> None:
        """Say what will run, report checkpoints this run will not touch, start the data stream."""
        cfg, acc, display = self.cfg, self.acc, self.display
        display.set_start(self.step)
        for line in self.task.describe(acc, self.total):
            display.print(line)
        sched = self.task.schedule(self.total)
        display.print(
            f"schedule: {self.total:,} steps, lr {cfg.lr:g} {cfg.schedule} → {sched['min_lr']:g}, warmup "
            f"{sched['warmup']}; precision {cfg.precision}; {parallelism(acc)} on {acc.device}"
        )
        if self.resume_from is not None:
            display.print(f"resuming from {self.resume_from} (step {self.step:,}, {self.tokens:,} tokens)")
        if acc.device.type == "cpu" and cfg.cpu_keep_memory and not keep_freed_memory():
            display.print("note: --cpu-keep-memory has no effect here (it needs glibc's malloc)")
        if self.main:
            for folder, why in ckpt.foreign_checkpoints(self.run_dir / ckpt.CHECKPOINTS, self.plan.run_id):
                display.warn(
                    f"kept {folder} ({why}): this run did not write it, so it is never deleted; remove it "
                    "yourself if it is not needed"
                )
        self._check_best_folder()
        self.task.start(acc, self.step, self.total)
        self.stats_layers = moe_layers_of(self.model)
        for moe in self.stats_layers.values():
            moe.stats.reset()

    def _check_best_folder(self) -> None:
        """On resume, best/ must be the best of the run up to the checkpoint: one written after it (by a
        session that ended before its next checkpoint) is rebuilt from the best checkpoint."""
        if not (self.main and self.task.select_key and self.resume_from is not None):
            return
        want = None if self.best is None else int(self.best["step"])
        if best_step(self.run_dir) == want:
            return
        source = ckpt.checkpoint_path(self.run_dir, want) if want is not None else None
        if source is not None and ckpt.verify_checkpoint(source) is None:
            write_best(
                self.run_dir, source, self._best_summary(ckpt.read_trainer_state(source).get("best_eval"))
            )
            self.display.warn(
                f"rebuilt {self.run_dir / 'best'} from {source}: it held a model from after the checkpoint"
            )
        elif (self.run_dir / "best").exists():
            import shutil

            shutil.rmtree(self.run_dir / "best")
            self.display.warn("removed best/: it held a model from after the checkpoint resumed from")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        task, cfg = self.task, self.cfg
        self.interval = _Interval(task.keys)
        stop = StopRequest(announce=self.main)
        with stop:
            if self.step == 0 and task.evaluates() and self.total > 0:
                self._evaluate()  # the starting point: step 0 of the curves
            self.interval.restart()
            self.display.restart_clock()
            while self.step < self.total:
                values, lr, gnorm, stop_all = self._one_step(stop)
                step = self.step
                if step % cfg.log_every == 0 or step == self.total or stop_all:
                    self._log(lr)
                if task.evaluates() and task.eval_due(step, self.total):
                    self._evaluate()
                    self.interval.restart_clock()
                if (cfg.save_every and step % cfg.save_every == 0) or step == self.total or stop_all:
                    self._save()
                    self.interval.restart_clock()
                if self.on_step is not None:
                    self.on_step(step, {**values, "lr": lr, "grad_norm": gnorm})
                if stop_all:
                    self.result.stopped_by = stop.signum or 15  # another process received it
                    self.display.print(f"stopped at step {step:,}; resume with --resume")
                    break

    def _one_step(self, stop: StopRequest) -> tuple[dict, float, float, bool]:
        """Forward/backward of the step's micro-batches, one all-reduce of the figures, then the update
        (or the named non-finite stop)."""
        acc, cfg, keys = self.acc, self.cfg, self.task.keys
        sums = self.task.forward_backward(acc, self.model)
        grad_norm = clip_gradients(acc, self.model, cfg.clip)
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=acc.device)
        host = acc.reduce(torch.cat([sums, flag]), "sum").tolist()
        n_micro = cfg.grad_accum * self.W
        values = {k: host[i] / n_micro for i, k in enumerate(keys)}
        correct, counted, tokens = host[len(keys) : len(keys) + 3]
        stop_all = host[-1] > 0
        gnorm = float(grad_norm) if grad_norm is not None else float("nan")

        bad_loss = not math.isfinite(values["loss"])
        # fp16 overflows are routine: the GradScaler skips those steps and lowers its scale.
        bad_grad = grad_norm is not None and not math.isfinite(gnorm) and cfg.precision != "fp16"
        if bad_loss or bad_grad:
            if not cfg.skip_nonfinite:
                what, value = ("loss", values["loss"]) if bad_loss else ("gradient norm", gnorm)
                raise NonFiniteError(self.step + 1, what, value, self.last_saved)
            self.skipped += 1
            if acc.scaler is not None:
                acc.scaler.update()  # close the scaler's unscale_ of this step
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()  # the schedule follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_this_session += 1
        self.tokens += round(tokens)
        r = self.result
        r.step, r.tokens, r.skipped_nonfinite = self.step, self.tokens, self.skipped
        self.interval.add(values, correct, counted, gnorm, round(tokens))
        self.display.step(self.step, values["loss"], self.interval.tokens_per_s(), self.interval.accuracy())
        return values, lr, gnorm, stop_all

    def _log(self, lr: float) -> None:
        record = {
            "kind": "train",
            "step": self.step,
            **self.interval.means(),
            "lr": lr,
            "tokens": self.tokens,
            "skipped_nonfinite": self.skipped,
            **self.task.record_fields(),
        }
        if self.stats_layers:
            stats = {i: m.stats for i, m in self.stats_layers.items()}
            summary = routing_summary(stats, reduce=lambda t: self.acc.reduce(t, "sum"))
            record["routing"] = {str(i): s for i, s in summary.items()}
            for moe in self.stats_layers.values():
                moe.stats.reset()  # each record covers its own interval
        self._write(record)
        self.display.train_record(record)
        self.interval.restart()

    def _write(self, record: dict) -> None:
        self.metrics.write(record)
        if self.acc.log_with:
            self.acc.log(tracker_scalars(record), step=record["step"])

    def _evaluate(self) -> None:
        record = self.task.evaluate(self.acc, self.model, self.step)
        self._write(record)
        self.display.print(self.task.format_eval(record))
        self.result.last_eval = record
        key = self.task.select_key
        if key is None or self.step == 0:
            return  # the untrained head at step 0 is no candidate for best/
        value = record.get(key)
        if (
            value is None
            or not math.isfinite(value)
            or (self.best is not None and value <= self.best["value"])
        ):
            return
        self.best = {"step": self.step, "value": value}
        self.result.best = self.best
        self.best_eval = {k: v for k, v in record.items() if k != "routing"}
        self._save()  # best/ is linked from this checkpoint, which pruning then keeps
        if self.main:
            write_best(self.run_dir, self.last_saved, self._best_summary(self.best_eval))
        self.acc.wait_for_everyone()
        self.result.best_dir = self.run_dir / "best"
        self.display.print(f"best {key} so far ({value:.4f}): step {self.step:,} → {self.result.best_dir}")

    def _best_summary(self, record: dict | None) -> dict:
        return {"step": self.best["step"], self.task.select_key: self.best["value"], "eval": record}

    # ------------------------------------------------------------------ saving
    def _save(self) -> None:
        if self.last_saved_step == self.step:
            return
        folder = ckpt.checkpoint_path(self.run_dir, self.step)
        if self.main and folder.exists() and not ckpt.owned_by(folder, self.plan.run_id):
            moved = ckpt.set_aside(folder)
            self.display.warn(
                f"{folder} was not written by this run; moved it to {moved} to save step {self.step}"
            )
        t0 = time.perf_counter()
        ckpt.save_checkpoint(self.acc, self.model, self.tokenizer, folder, self.step, self._write_state)
        if self.main:
            protect = (int(self.best["step"]),) if self.best else ()
            root = self.run_dir / ckpt.CHECKPOINTS
            for old in ckpt.prune(root, self.cfg.keep_last, self.step, self.plan.run_id, protect):
                self.result.checkpoints = [c for c in self.result.checkpoints if c != old]
        self.acc.wait_for_everyone()
        self.last_saved, self.last_saved_step = folder, self.step
        self.result.checkpoints.append(folder)
        self.display.print(f"saved {folder} ({time.perf_counter() - t0:.1f} s)")

    def _write_state(self, state_dir: Path) -> None:
        extra = self.task.save_state(state_dir)
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_nonfinite": self.skipped,
            "world_size": self.W,
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            **extra,
            "run_id": self.plan.run_id,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.task.select_key:
            state["best"] = self.best
            state["best_eval"] = self.best_eval
        (state_dir / ckpt.TRAINER_STATE).write_text(json.dumps(state, indent=1))

    def _finish(self) -> None:
        if self.last_saved_step != self.step:
            self._save()
        self.result.final_dir = self._save_final()
        self.display.print(
            f"done: {self.step:,} steps, {self.tokens:,} tokens; model in {self.result.final_dir}"
        )

    def _save_final(self) -> Path:
        """``RUN_DIR/final``: the trained model as a Hugging Face folder (written atomically)."""
        from accelerate.utils import broadcast_object_list

        from upcycle.io import atomic_output_dir

        final, acc, r = self.run_dir / "final", self.acc, self.result
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_output_dir(final, overwrite=True)) if self.main else None
            tmp = Path(broadcast_object_list([str(tmp) if self.main else None])[0])
            ckpt.save_model(acc, self.model, self.tokenizer, tmp)
            if self.main:
                summary = {
                    "step": r.step,
                    "tokens": r.tokens,
                    "skipped_nonfinite": r.skipped_nonfinite,
                    "last_eval": {k: v for k, v in (r.last_eval or {}).items() if k != "routing"} or None,
                }
                if self.task.select_key:
                    summary["best"] = self.best
                (tmp / "training.json").write_text(json.dumps(summary, indent=1))
            acc.wait_for_everyone()
        acc.wait_for_everyone()
        return final


class _Interval:
    """Sums over the steps since the last training record; tokens/s over the wall time of training only
    (the clock restarts after evaluations and checkpoints)."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.restart()

    def restart(self) -> None:
        self.n = 0
        self.sums = dict.fromkeys(self.keys, 0.0)
        self.correct = self.counted = 0.0
        self.grad_norm = 0.0
        self.tokens = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()
        self.clock_tokens = 0

    def add(self, values: dict, correct: float, counted: float, grad_norm: float, tokens: int) -> None:
        self.n += 1
        for k in self.keys:
            self.sums[k] += values[k]
        self.correct += correct
        self.counted += counted
        self.grad_norm += grad_norm
        self.tokens += tokens
        self.clock_tokens += tokens

    def tokens_per_s(self) -> float | None:
        dt = time.perf_counter() - self.t0
        return self.clock_tokens / dt if dt > 0 and self.clock_tokens else None

    def accuracy(self) -> float | None:
        return self.correct / self.counted if self.counted else None

    def means(self) -> dict:
        n = max(self.n, 1)
        out = {k: self.sums[k] / n for k in self.keys}
        out["accuracy"] = self.correct / self.counted if self.counted else float("nan")
        out["grad_norm"] = self.grad_norm / n
        out["tokens_per_s"] = self.tokens_per_s() or 0.0
        return out


#: Names that moved to :mod:`upcycle.training.pretraining` when the engine was shared with fine-tuning;
#: still importable from here.
_MOVED = ("MOE_LOSSES", "EvalBatches", "context_length", "describe_model", "eval_source", "forward_backward",
          "load_model", "pretrain")  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED:
        from upcycle.training import pretraining

        return getattr(pretraining, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NonFiniteError", "PretrainResult", "TrainResult", "clip_gradients", "make_optimizer", "train"]
