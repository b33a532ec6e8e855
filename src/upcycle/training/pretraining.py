"""``upcycle pretrain``: continued pretraining of MoE and dense causal LMs, as a task of the shared engine.

Data: documents streamed from a hub dataset or local files, tokenised in a background thread, packed into
``seq_len`` blocks and shuffled (:mod:`upcycle.data.packing`); the stream position is saved with every
checkpoint. Loss: the model's ``loss`` with ``labels = input_ids`` (the LM loss plus, for MoE models,
the weighted auxiliary losses). Metrics: next-token accuracy in training, held-out loss, perplexity and
accuracy in evaluation (:func:`upcycle.evaluation.lm.evaluate_lm`). Everything else is the engine's
(:mod:`upcycle.training.loop`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from upcycle.config import ConfigError, UserError
from upcycle.data.packing import PackedBlocks, PipelineState, Prefetcher
from upcycle.data.sources import DocumentStream, SourceSpec, resolve_source
from upcycle.evaluation.lm import evaluate_lm, moe_layers_of, next_token_counts
from upcycle.training.config import FIXED_ON_RESUME, PretrainConfig
from upcycle.training.loop import TrainResult, train
from upcycle.training.reporting import format_eval_line
from upcycle.training.task import Task

#: Loss fields of an MoE model's output, logged per step (dense models only have ``loss``).
MOE_LOSSES = ("lm_loss", "aux_loss", "load_balancing_loss", "z_loss", "importance_loss")


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


# --------------------------------------------------------------------------- model


def load_model(name: str):
    """A causal LM in float32 from a folder (upcycled or dense), a preset (from scratch) or a hub id."""
    from upcycle.models.loading import load_causal_lm

    return load_causal_lm(name)


def context_length(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


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


def pad_token_for(tokenizer, model) -> None:
    """Give the tokenizer the pad token the model's config uses (GPT-2's has none, so a saved folder's
    ``tokenizer(batch, padding=True)`` would raise; issue 11)."""
    pad_id = getattr(model.config, "pad_token_id", None)
    if isinstance(pad_id, int) and tokenizer.pad_token_id != pad_id and 0 <= pad_id < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)


# --------------------------------------------------------------------------- one optimizer step


def forward_backward(accelerator, model, micro_batches: Iterable, keys: tuple[str, ...]) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (each (B, S) token ids, labels = inputs).

    Returns the step's sums on the device: the output fields ``keys`` (``loss`` and, for MoE models,
    the auxiliary terms), then next-token correct and counted, and tokens. Only the last micro-batch
    synchronises gradients across processes (``accelerator.accumulate``).
    """
    sums = torch.zeros(len(keys) + 3, device=accelerator.device)
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
                + [correct.float(), counted.float(), zero + ids_BS.numel()]
            )
    return sums


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
        self.spec, self.tokenizer, self.seq_len = spec, tokenizer, seq_len
        self.micro_batch, self.n = micro_batch, n
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


# --------------------------------------------------------------------------- the task


class PretrainTask(Task):
    """Packed text, LM loss, held-out perplexity: what ``upcycle pretrain`` brings to the engine."""

    command = "pretrain"
    fixed_on_resume = FIXED_ON_RESUME

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self.prefetch: Prefetcher | None = None
        self.blocks: PackedBlocks | None = None
        self.evals: EvalBatches | None = None

    def check_sources(self) -> None:
        # Sources first: a missing file fails before the model is loaded.
        cfg = self.cfg
        _quiet_hf_notes()
        self.train_spec = resolve_source(cfg.data, cfg.resolved_data_config, cfg.data_split, cfg.text_field)
        self.eval_spec = eval_source(cfg, self.train_spec)

    def load(self, resume_from: Path | None):
        from upcycle.data.tokenizers import load_tokenizer
        from upcycle.models.presets import PRESETS

        cfg = self.cfg
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
            raise UserError(
                f"the tokenizer's EOS id {tokenizer.eos_token_id} is outside the model's vocabulary"
            )
        pad_token_for(tokenizer, model)
        self.tokenizer_name = tok_name
        self.keys = ("loss", *MOE_LOSSES) if moe_layers_of(model) else ("loss",)
        self.description = describe_model(model, cfg.seq_len)
        return model, tokenizer

    def prepare_data(self, accelerator, tokenizer, model) -> None:
        cfg = self.cfg
        self.W, self.rank = accelerator.num_processes, accelerator.process_index
        self.blocks = PackedBlocks(
            DocumentStream(self.train_spec, seed=cfg.seed),
            tokenizer,
            cfg.seq_len,
            cfg.shuffle_buffer,
            cfg.seed,
        )
        if self.eval_spec is not None:
            self.evals = EvalBatches(self.eval_spec, tokenizer, cfg.seq_len, cfg.batch_size, cfg.eval_batches)

    def schedule(self, total: int) -> dict:
        cfg = self.cfg
        return dict(
            lr=cfg.lr,
            min_lr=cfg.resolved_min_lr,
            warmup=cfg.resolved_warmup,
            steps=total,
            schedule=cfg.schedule,
        )

    def tracker_config(self) -> dict:
        out = self.cfg.resolved().to_dict()
        out.update(warmup=self.cfg.resolved_warmup, tokenizer=self.tokenizer_name)
        out["eval_data"] = self.eval_spec.describe() if self.eval_spec else "none"
        return out

    def restore(self, state_dir: Path) -> None:
        self.blocks.restore(PipelineState.load(state_dir))

    def start(self, accelerator, step: int, total: int) -> None:
        rounds = max(0, (total - step) * self.cfg.grad_accum)
        self.prefetch = Prefetcher(self.blocks, self.cfg.batch_size, self.W, self.rank, max_rounds=rounds)

    def describe(self, accelerator, total: int) -> list[str]:
        cfg, W = self.cfg, self.W
        per_step = cfg.batch_size * cfg.grad_accum * W
        return [
            f"model: {self.description}",
            f"data: {self.train_spec.describe()} → {cfg.seq_len}-token blocks, shuffle buffer "
            f"{cfg.shuffle_buffer}, seed {cfg.seed}; eval: {self.eval_spec.describe() if self.eval_spec else 'none'}",
            f"effective batch: {per_step} sequences = {cfg.batch_size} per process × {cfg.grad_accum} "
            f"accumulation × {W} process{'es' if W > 1 else ''} = {per_step * cfg.seq_len:,} tokens per step",
        ]

    def save_state(self, state_dir: Path) -> dict:
        self.prefetch.state.save(state_dir)
        return {"seq_len": self.cfg.seq_len, "documents": self.prefetch.state.meta["docs"]["documents"]}

    def forward_backward(self, accelerator, model) -> torch.Tensor:
        micro_batches = (self.prefetch.next() for _ in range(self.cfg.grad_accum))
        return forward_backward(accelerator, model, micro_batches, self.keys)

    def record_fields(self) -> dict:
        return {"epoch": self.prefetch.state.meta["docs"]["epoch"]}

    def evaluates(self) -> bool:
        return self.evals is not None

    def eval_due(self, step: int, total: int) -> bool:
        every = self.cfg.eval_every
        return bool(every and step % every == 0) or step == total

    def evaluate(self, accelerator, model, step: int) -> dict:
        res = evaluate_lm(
            model,
            self.evals.for_process(accelerator.process_index, accelerator.num_processes),
            device=accelerator.device,
            reduce=lambda t: accelerator.reduce(t, "sum"),
        )
        return {"kind": "eval", "step": step, **res.to_dict()}

    def format_eval(self, record: dict) -> str:
        return format_eval_line(record)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()

    @property
    def documents_read(self) -> int:
        return self.prefetch.session_documents if self.prefetch is not None else 0


def pretrain(cfg: PretrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.steps`` optimizer steps (continued pretraining).

    ``on_step(step, info)`` is called after every optimizer step (notebooks, tests).
    """
    return train(PretrainTask(cfg), on_step=on_step)


__all__ = [
    "MOE_LOSSES",
    "EvalBatches",
    "PretrainTask",
    "context_length",
    "describe_model",
    "eval_source",
    "forward_backward",
    "load_model",
    "pretrain",
]
