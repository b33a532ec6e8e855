"""The training loop of ``upcycle pretrain``: continued pretraining of MoE and dense causal LMs on Accelerate.

One optimizer step = ``grad_accum`` micro-batches per process, each a forward with ``labels`` whose
``loss`` is the LM loss plus, for MoE models, the config-weighted auxiliary losses of every MoE layer
(``MoECausalLMMixin``). That single loss goes through ``accelerator.backward``, which divides it by the
accumulation steps, and DDP averages gradients over processes, so the auxiliary losses are scaled exactly
like the LM loss: W processes × A micro-batches give the gradient of the mean loss over the W·A
micro-batches, the same as one process with W·A micro-batches (issue 4's 2-process test checks this).

Per step, one all-reduce carries the losses, next-token counts and the stop flag, so every process
agrees on non-finite steps and on SIGTERM; per log interval, one more carries the routing counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle.config import ConfigError, UserError, dump_yaml, load_yaml, normalise_keys
from upcycle.data.packing import PackedBlocks, PipelineState, Prefetcher
from upcycle.data.sources import DocumentStream, SourceSpec, resolve_source
from upcycle.evaluation.lm import evaluate_lm, moe_layers_of, next_token_counts, routing_summary
from upcycle.training import checkpoint as ckpt
from upcycle.training.config import PretrainConfig, check_resume_compatible
from upcycle.training.memory import keep_freed_memory
from upcycle.training.reporting import Display, MetricsLog, format_eval_line, tracker_scalars
from upcycle.training.schedule import make_scheduler
from upcycle.training.signals import StopRequest

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
#: Loss fields of an MoE model's output, logged per step (dense models only have ``loss``).
MOE_LOSSES = ("lm_loss", "aux_loss", "load_balancing_loss", "z_loss", "importance_loss")
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "config.yaml", "run.json", "tensorboard")


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
class PretrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_dir: Path | None = None
    stopped_by: int | None = None
    """Signal number that stopped the run early (after saving), or None."""
    skipped_nonfinite: int = 0
    documents_read: int = 0
    """Training documents this process read in this session (resume reads only unconsumed ones)."""
    resumed_from: Path | None = None
    last_eval: dict | None = None
    checkpoints: list[Path] = field(default_factory=list)


class _PackedInputNotes(logging.Filter):
    """Drops two Hugging Face notes that do not apply here: packed blocks hold EOS (GPT-2's pad id)
    between documents but no padding, and an unset ``loss_type`` already means the causal-LM loss."""

    NOTES = ("since your input_ids may be padded", "was set in the config but it is unrecognized")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.NOTES)


def _quiet_hf_notes() -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _PackedInputNotes) for f in logger.filters):
        logger.addFilter(_PackedInputNotes())


# --------------------------------------------------------------------------- model and optimizer


def load_model(name: str):
    """A causal LM in float32 from a folder (upcycled or dense), a preset (from scratch) or a hub id."""
    from transformers import AutoModelForCausalLM

    from upcycle.models.presets import PRESETS, build_model

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                "model", name, "the folder has no config.json (not a Hugging Face model folder)"
            )
        source = str(path)
    elif name in PRESETS:
        return build_model(name)
    elif name.startswith((".", "/", "~")):
        raise ConfigError("model", name, "no such model folder")
    else:
        source = name
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load model '{name}': {first}") from exc


def context_length(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def make_optimizer(model, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm gains are not decayed, as in GPT-2 and
    nanoGPT), fused where PyTorch supports it (CPU and CUDA since 2.4; bitwise deterministic)."""
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


def describe_model(model, seq_len: int) -> str:
    from upcycle.analysis.accounting import account

    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    layers = moe_layers_of(model)
    if not layers:
        return f"dense {cfg.model_type}, {n / 1e6:.1f}M parameters"
    acc = account(cfg, n, seq_len)
    m = next(iter(layers.values())).config
    return (
        f"MoE {cfg.model_type}, {n / 1e6:.1f}M parameters ({acc.active_params / 1e6:.1f}M active per token), "
        f"{len(layers)} MoE layer{'s' if len(layers) > 1 else ''} × {m.num_experts} experts, top-{m.top_k}"
    )


# --------------------------------------------------------------------------- one optimizer step


def forward_backward(accelerator, model, micro_batches, keys: tuple[str, ...]) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (each (B, S) token ids, labels = inputs).

    Returns the step's sums on the device: the output fields ``keys`` (``loss`` and, for MoE models,
    the auxiliary terms), then next-token correct and counted. Only the last micro-batch synchronises
    gradients across processes (``accelerator.accumulate``).
    """
    sums = torch.zeros(len(keys) + 2, device=accelerator.device)
    for ids_BS in micro_batches:
        ids_BS = ids_BS.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            out = model(input_ids=ids_BS, labels=ids_BS)
            # One backward of the full loss: Accelerate divides it by the accumulation steps and DDP
            # averages over processes, so the auxiliary terms are scaled exactly like the LM loss.
            accelerator.backward(out.loss)
        with torch.no_grad():
            correct, counted = next_token_counts(out.logits, ids_BS)
            zero = out.loss.new_zeros(())  # a model whose MoE layers have no router has no aux terms
            values = [getattr(out, k) for k in keys]
            sums += torch.stack(
                [(zero if v is None else v).detach().float() for v in values]
                + [correct.float(), counted.float()]
            )
    return sums


def clip_gradients(accelerator, model, clip: float) -> torch.Tensor | None:
    """Global gradient norm before clipping (clip ≤ 0: measured, not clipped); None under DeepSpeed,
    which clips inside its engine."""
    return accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))


# --------------------------------------------------------------------------- run folder


def _on_main(accelerator, fn: Callable[[], object]):
    """Run ``fn`` on the main process and share its result (or its user-facing error) with all."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except ConfigError as exc:
            error = ("config", exc.field, exc.value, exc.allowed)
        except UserError as exc:
            error = ("user", str(exc))
    result, error = broadcast_object_list([result, error])
    if error is not None:
        raise ConfigError(*error[1:]) if error[0] == "config" else UserError(error[1])
    return result


def prepare_run_dir(cfg: PretrainConfig) -> dict:
    """Check/clean the run folder and pick the checkpoint to resume from (main process)."""
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("out", cfg.out, "exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if cfg.overwrite:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif previous and not cfg.resume:
        raise ConfigError("out", cfg.out, "holds a previous run; pass --resume to continue it or --overwrite")
    ckpt.clean_temporaries(run_dir / ckpt.CHECKPOINTS)
    warnings: list[str] = []
    found = ckpt.find_resumable(run_dir, warn=warnings.append) if cfg.resume else None
    if found is not None and (run_dir / "config.yaml").is_file():
        saved = PretrainConfig.from_dict(normalise_keys(load_yaml(run_dir / "config.yaml")))
        check_resume_compatible(saved, cfg)
    run_info_path = run_dir / "run.json"
    run_info = {}
    if run_info_path.is_file():
        run_info = json.loads(run_info_path.read_text())
    if "id" not in run_info:
        run_info = {"id": uuid.uuid4().hex[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        run_info_path.write_text(json.dumps(run_info, indent=1))
    dump_yaml(cfg.resolved().to_dict(), run_dir / "config.yaml")
    return {
        "resume": None if found is None else str(found[1]),
        "warnings": warnings,
        "run_id": run_info["id"],
    }


# --------------------------------------------------------------------------- data


def eval_source(cfg: PretrainConfig, train: SourceSpec) -> SourceSpec | None:
    """--eval-data: 'none'; a given source; or by default the validation split of a hub --data."""
    if cfg.eval_data is not None and cfg.eval_data.lower() == "none":
        return None
    if cfg.eval_data is None:
        if train.is_local:
            return None
        return SourceSpec(train.name, train.config, cfg.eval_split, cfg.text_field)
    config = cfg.resolved_data_config if cfg.eval_data == cfg.data else None
    return resolve_source(cfg.eval_data, config, cfg.eval_split, cfg.text_field, field="eval_data")


class EvalBatches:
    """The first ``n`` micro-batches of the held-out stream (same ones every evaluation, cached).

    Micro-batch j goes to process j mod W; processes with fewer pad with a weight-0 batch, so all make
    the same number of forward calls (DDP buffer broadcasts and FSDP all-gathers need that), and the
    evaluated set does not depend on the number of processes.
    """

    def __init__(self, spec: SourceSpec, tokenizer, seq_len: int, micro_batch: int, n: int):
        self.spec, self.tokenizer, self.seq_len, self.micro_batch, self.n = (
            spec,
            tokenizer,
            seq_len,
            micro_batch,
            n,
        )
        self.cache: list[torch.Tensor] | None = None
        self.available = 0

    def for_process(self, rank: int, world: int) -> list[tuple[torch.Tensor, float]]:
        if self.cache is None:
            stream = PackedBlocks(
                DocumentStream(self.spec, loop=False, field="eval_data"), self.tokenizer, self.seq_len
            )
            batches = []
            for _ in range(self.n):
                batch = stream.next_round(self.micro_batch)
                if batch is None:
                    break
                batches.append(torch.from_numpy(batch).long())
            if not batches:
                raise UserError(
                    f"the evaluation data {self.spec.describe()} has fewer than one micro-batch "
                    f"({self.micro_batch} × {self.seq_len} tokens)"
                )
            self.cache, self.available = batches, len(batches)
        mine = [(b, 1.0) for j, b in enumerate(self.cache) if j % world == rank]
        calls = math.ceil(len(self.cache) / world)
        return mine + [(self.cache[0], 0.0)] * (calls - len(mine))


# --------------------------------------------------------------------------- the loop


def _parallelism(accelerator) -> str:
    kind = accelerator.distributed_type.value
    return "single process" if kind == "NO" else f"{kind} × {accelerator.num_processes} processes"


def pretrain(cfg: PretrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> PretrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.steps`` optimizer steps; see the module docstring.

    ``on_step(step, info)`` is called after every optimizer step (notebooks, tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cfg.validate()
    cfg.check_runnable()
    _quiet_hf_notes()
    if cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb needs the wandb package: pip install 'upcycle[wandb]'")
    run_dir = Path(cfg.out)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=_PRECISION[cfg.precision],
        log_with=[t for t, on in (("tensorboard", cfg.tensorboard), ("wandb", cfg.wandb)) if on] or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
    )
    display = Display(cfg.steps, 0, cfg.progress, enabled=accelerator.is_main_process)
    try:
        return _train(cfg, accelerator, display, on_step)
    finally:
        display.close()
        accelerator.end_training()
        if accelerator.num_processes == 1:
            # Accelerate's state is a process-wide singleton: reset it so a later call (a notebook, a test)
            # can use another precision or accumulation.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def _train(cfg: PretrainConfig, accelerator, display: Display, on_step) -> PretrainResult:
    from accelerate.utils import set_seed

    from upcycle.data.tokenizers import load_tokenizer
    from upcycle.models.presets import PRESETS

    run_dir = Path(cfg.out)
    main = accelerator.is_main_process
    W, rank = accelerator.num_processes, accelerator.process_index
    info = _on_main(accelerator, lambda: prepare_run_dir(cfg))
    for line in info["warnings"]:
        display.warn(line)
    resume_from = Path(info["resume"]) if info["resume"] else None
    if cfg.resume and resume_from is None:
        display.print(f"no usable checkpoint in {run_dir / ckpt.CHECKPOINTS}: starting from step 0")

    # Sources first: a missing file fails before the model is loaded.
    train_spec = resolve_source(cfg.data, cfg.resolved_data_config, cfg.data_split, cfg.text_field)
    eval_spec = eval_source(cfg, train_spec)

    # ---- model, tokenizer, optimizer. Seeding first makes a preset's initialisation reproducible; on
    # resume, the RNG states saved with the checkpoint are restored below and replace this.
    set_seed(cfg.seed)
    model = load_model(str(resume_from) if resume_from else cfg.model)
    tok_name = cfg.tokenizer or (
        str(resume_from)
        if resume_from
        else PRESETS[cfg.model].tokenizer
        if cfg.model in PRESETS
        else cfg.model
    )
    tokenizer = load_tokenizer(tok_name, model_config=model.config)
    limit = context_length(model.config)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError("seq_len", cfg.seq_len, f"must be ≤ the model's context length ({limit})")
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id >= model.config.vocab_size:
        raise UserError(f"the tokenizer's EOS id {tokenizer.eos_token_id} is outside the model's vocabulary")
    is_moe = bool(moe_layers_of(model))
    description = describe_model(model, cfg.seq_len)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(
        optimizer,
        lr=cfg.lr,
        min_lr=cfg.resolved_min_lr,
        warmup=cfg.resolved_warmup,
        steps=cfg.steps,
        schedule=cfg.schedule,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: Accelerate would step it once per process per optimizer step.
    accelerator.register_for_checkpointing(scheduler)
    # The model is saved as a Hugging Face folder beside training_state/; keep Accelerate from writing
    # (and reading) a second copy of the weights there.
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())

    # ---- data
    blocks = PackedBlocks(
        DocumentStream(train_spec, seed=cfg.seed), tokenizer, cfg.seq_len, cfg.shuffle_buffer, cfg.seed
    )
    step, tokens, skipped = 0, 0, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / ckpt.STATE_DIR))
        state = ckpt.read_trainer_state(resume_from)
        step, tokens, skipped = (
            int(state["step"]),
            int(state["tokens"]),
            int(state.get("skipped_nonfinite", 0)),
        )
        blocks.restore(PipelineState.load(resume_from / ckpt.STATE_DIR))
    evals = (
        EvalBatches(eval_spec, tokenizer, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
        if eval_spec
        else None
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    if cfg.resume:
        # Records written after the checkpoint (or all, when no checkpoint was usable) are redone.
        metrics.truncate_after(step if resume_from is not None else -1)

    # ---- trackers
    if accelerator.log_with:
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in cfg.resolved().to_dict().items()
        }
        init_kwargs = {
            "tensorboard": {"purge_step": step} if cfg.resume else {},
            "wandb": {"id": info["run_id"], "resume": "allow", "name": run_dir.name, "dir": str(run_dir)},
        }
        accelerator.init_trackers(cfg.wandb_project, config=flat, init_kwargs=init_kwargs)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * W * cfg.seq_len
    display.set_start(step)
    display.print(f"model: {description}")
    display.print(
        f"data: {train_spec.describe()} → {cfg.seq_len}-token blocks, shuffle buffer {cfg.shuffle_buffer}, "
        f"seed {cfg.seed}; eval: {eval_spec.describe() if eval_spec else 'none'}"
    )
    display.print(
        f"effective batch: {cfg.batch_size * cfg.grad_accum * W} sequences = {cfg.batch_size} per process × "
        f"{cfg.grad_accum} accumulation × {W} process{'es' if W > 1 else ''} = {tokens_per_step:,} tokens per step"
    )
    display.print(
        f"schedule: {cfg.steps:,} steps, lr {cfg.lr:g} {cfg.schedule} → {cfg.resolved_min_lr:g}, warmup {cfg.resolved_warmup}; "
        f"precision {cfg.precision}; {_parallelism(accelerator)} on {accelerator.device}"
    )
    if resume_from is not None:
        display.print(f"resuming from {resume_from} (step {step:,}, {tokens:,} tokens)")
    if accelerator.device.type == "cpu" and cfg.cpu_keep_memory and not keep_freed_memory():
        display.print("note: --cpu-keep-memory has no effect here (it needs glibc's malloc)")

    result = PretrainResult(run_dir, step, tokens, resumed_from=resume_from, skipped_nonfinite=skipped)
    last_saved: Path | None = resume_from
    last_saved_step = step if resume_from is not None else -1
    prefetch = Prefetcher(
        blocks, cfg.batch_size, W, rank, max_rounds=max(0, (cfg.steps - step) * cfg.grad_accum)
    )

    def write_extra(state_dir: Path) -> None:
        prefetch.state.save(state_dir)
        (state_dir / ckpt.TRAINER_STATE).write_text(
            json.dumps(
                {
                    "step": step,
                    "tokens": tokens,
                    "skipped_nonfinite": skipped,
                    "world_size": W,
                    "batch_size": cfg.batch_size,
                    "grad_accum": cfg.grad_accum,
                    "seq_len": cfg.seq_len,
                    "documents": prefetch.state.meta["docs"]["documents"],
                    "run_id": info["run_id"],
                    "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
                indent=1,
            )
        )

    def save() -> None:
        nonlocal last_saved, last_saved_step
        if last_saved_step == step:
            return
        folder = ckpt.checkpoint_path(run_dir, step)
        t0 = time.perf_counter()
        ckpt.save_checkpoint(accelerator, model, tokenizer, folder, step, write_extra)
        if main:
            for old in ckpt.prune(run_dir / ckpt.CHECKPOINTS, cfg.keep_last, step):
                result.checkpoints = [c for c in result.checkpoints if c != old]
        accelerator.wait_for_everyone()
        last_saved, last_saved_step = folder, step
        result.checkpoints.append(folder)
        display.print(f"saved {folder} ({time.perf_counter() - t0:.1f} s)")

    def evaluate() -> None:
        if evals is None:
            return
        res = evaluate_lm(
            model,
            evals.for_process(rank, W),
            device=accelerator.device,
            reduce=lambda t: accelerator.reduce(t, "sum"),
        )
        record = {"kind": "eval", "step": step, **res.to_dict()}
        metrics.write(record)
        if accelerator.log_with:
            accelerator.log(tracker_scalars(record), step=step)
        display.print(format_eval_line(record))
        result.last_eval = record

    keys = ("loss", *MOE_LOSSES) if is_moe else ("loss",)
    stats_layers = moe_layers_of(model)
    for moe in stats_layers.values():
        moe.stats.reset()
    interval = _Interval(keys)
    stop = StopRequest(announce=main)
    try:
        with stop:
            if step == 0 and evals is not None and cfg.steps > 0:
                evaluate()  # the starting point: how much did upcycling cost? (step 0 of the curves)
            interval.restart()
            display.restart_clock()
            while step < cfg.steps:
                # --- one optimizer step: grad_accum micro-batches, then one all-reduce of the figures.
                sums = forward_backward(
                    accelerator, model, (prefetch.next() for _ in range(cfg.grad_accum)), keys
                )
                grad_norm = clip_gradients(accelerator, model, cfg.clip)
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
                host = accelerator.reduce(torch.cat([sums, flag]), "sum").tolist()
                n_micro = cfg.grad_accum * W
                values = {k: host[i] / n_micro for i, k in enumerate(keys)}
                correct_n, counted_n, stop_all = host[len(keys)], host[len(keys) + 1], host[-1] > 0
                gnorm = float(grad_norm) if grad_norm is not None else float("nan")

                bad_loss = not math.isfinite(values["loss"])
                # fp16 overflows are routine: the GradScaler skips those steps and lowers its scale.
                bad_grad = grad_norm is not None and not math.isfinite(gnorm) and cfg.precision != "fp16"
                if bad_loss or bad_grad:
                    if not cfg.skip_nonfinite:
                        what, value = ("loss", values["loss"]) if bad_loss else ("gradient norm", gnorm)
                        raise NonFiniteError(step + 1, what, value, last_saved)
                    skipped += 1
                    if accelerator.scaler is not None:
                        accelerator.scaler.update()  # close the scaler's unscale_ of this step
                else:
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()  # the schedule follows the step count, skipped steps included
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                result.step, result.tokens, result.skipped_nonfinite = step, tokens, skipped
                interval.add(values, correct_n, counted_n, gnorm, tokens_per_step)
                display.step(step, values["loss"], interval.tokens_per_s())

                if step % cfg.log_every == 0 or step == cfg.steps or stop_all:
                    record = {
                        "kind": "train",
                        "step": step,
                        **interval.means(),
                        "lr": lr,
                        "tokens": tokens,
                        "skipped_nonfinite": skipped,
                        "epoch": prefetch.state.meta["docs"]["epoch"],
                    }
                    if stats_layers:
                        record["routing"] = {
                            str(i): s
                            for i, s in routing_summary(
                                {i: m.stats for i, m in stats_layers.items()},
                                reduce=lambda t: accelerator.reduce(t, "sum"),
                            ).items()
                        }
                        for moe in stats_layers.values():
                            moe.stats.reset()  # each record covers its own interval
                    metrics.write(record)
                    if accelerator.log_with:
                        accelerator.log(tracker_scalars(record), step=step)
                    display.train_record(record)
                    interval.restart()
                if evals is not None and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
                ):
                    evaluate()
                    interval.restart_clock()
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop_all:
                    save()
                    interval.restart_clock()
                if on_step is not None:
                    on_step(step, {**values, "lr": lr, "grad_norm": gnorm})
                if stop_all:
                    result.stopped_by = stop.signum or 15  # another process received it
                    display.print(f"stopped at step {step:,}; resume with --resume")
                    break
        if result.stopped_by is None:
            if last_saved_step != step:
                save()
            result.final_dir = save_final(accelerator, model, tokenizer, run_dir, result)
            display.print(f"done: {step:,} steps, {tokens:,} tokens; model in {result.final_dir}")
    finally:
        prefetch.close()
        result.documents_read = prefetch.session_documents
    return result


def save_final(accelerator, model, tokenizer, run_dir: Path, result: PretrainResult) -> Path:
    """``RUN_DIR/final``: the trained model as a Hugging Face folder (written atomically)."""
    from accelerate.utils import broadcast_object_list

    from upcycle.io import atomic_output_dir

    final = run_dir / "final"
    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(final, overwrite=True)) if main else None
        tmp = Path(broadcast_object_list([str(tmp) if main else None])[0])
        ckpt.save_model(accelerator, model, tokenizer, tmp)
        if main:
            summary = {
                "step": result.step,
                "tokens": result.tokens,
                "skipped_nonfinite": result.skipped_nonfinite,
                "last_eval": {k: v for k, v in (result.last_eval or {}).items() if k != "routing"} or None,
            }
            (tmp / "training.json").write_text(json.dumps(summary, indent=1))
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
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

    def means(self) -> dict:
        n = max(self.n, 1)
        out = {k: self.sums[k] / n for k in self.keys}
        out["accuracy"] = self.correct / self.counted if self.counted else float("nan")
        out["grad_norm"] = self.grad_norm / n
        out["tokens_per_s"] = self.tokens_per_s() or 0.0
        return out


__all__ = ["NonFiniteError", "PretrainResult", "load_model", "make_optimizer", "pretrain"]
