"""``upcycle finetune``: sequence classification (XNLI by default) of MoE and dense models, as a task of
the shared engine (:mod:`upcycle.training.loop`).

Data: the train languages' ``train`` splits (hub or local hub-layout folder), encoded once in the pair
format of :mod:`upcycle.data.xnli` (premise + SEP + hypothesis, SEP = the tokenizer's separator or EOS,
nothing appended, longest-first truncation to ``--max-length``), concatenated and shuffled with the seed,
batched by length (:mod:`upcycle.data.classification`). Loss: cross-entropy of the logits at each row's
last real token (:func:`upcycle.models.pooling.sequence_logits`, pooled from the attention mask, never
from pad ids) plus, for MoE models, the model's weighted auxiliary losses, which keep training the
router (weights set with ``--aux-loss-weight`` / ``--z-loss-weight``, 0 allowed; router jitter applies
in training only). Validation: every train language's ``validation`` split, per-language accuracy and
loss in metrics.jsonl; the highest mean accuracy over the train languages is kept as ``RUN_DIR/best``
(XNLI's protocol: select on the train languages' dev sets).

Shape legend: B batch, S sequence, C classes, L languages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from upcycle.config import ConfigError, UserError
from upcycle.data.classification import EncodedExamples, TrainBatches, eval_batches
from upcycle.data.xnli import (
    PairFormat,
    check_fields,
    encode_examples,
    label_names,
    load_split,
)
from upcycle.evaluation.lm import isolated_routing_stats, moe_layers_of, routing_summary
from upcycle.models.pooling import sequence_logits
from upcycle.training.finetune_config import FIXED_ON_RESUME, FinetuneConfig, resolve_languages
from upcycle.training.loop import TrainResult, train
from upcycle.training.pretraining import MOE_LOSSES, context_length, describe_model, pad_token_for
from upcycle.training.task import Task

#: Loss fields of an MoE classifier's output besides ``loss``; dense models log only ``loss``.
MOE_TASK_LOSSES = ("task_loss", *MOE_LOSSES[1:])
#: Rows encoded per tokenizer call (bounds the Python lists a fast tokenizer returns).
ENCODE_CHUNK = 20_000


# --------------------------------------------------------------------------- data


@contextlib.contextmanager
def quiet_datasets():
    """No "Generating train split" bars while splits load: the command prints its own summary."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def label_ids(values: list, names: list[str], where: str) -> list[int]:
    """Label ids of a column (integer ids, or names mapped through ``names``); -1 marks unlabelled rows."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in index:
                raise ConfigError(
                    "label_names", ",".join(names), f"{where} has the label {v!r}, not among them"
                )
            out.append(index[v])
        elif v is None or int(v) < 0:
            out.append(-1)  # unlabelled (GLUE test splits use -1)
        elif int(v) >= len(names):
            raise ConfigError("label_names", ",".join(names), f"{where} has label id {int(v)}, beyond these")
        else:
            out.append(int(v))
    return out


def encode_split(
    dataset, tokenizer, fmt: PairFormat, cfg: FinetuneConfig, names: list[str], lang: str, where: str
):
    """One language's split as :class:`EncodedExamples` (unlabelled rows dropped)."""
    fields = cfg.text_field_list
    parts = []
    for start in range(0, len(dataset), ENCODE_CHUNK):
        chunk = dataset[start : start + ENCODE_CHUNK]
        columns = [["" if t is None else str(t) for t in chunk[f]] for f in fields]
        labels = label_ids(chunk[cfg.label_field], names, where)
        rows = encode_examples(tokenizer, columns, fmt)
        keep = [i for i, y in enumerate(labels) if y >= 0]
        parts.append(EncodedExamples.from_rows([rows[i] for i in keep], [labels[i] for i in keep], lang))
    merged = EncodedExamples.concat(parts) if parts else EncodedExamples.from_rows([], [], lang)
    merged.languages = [lang]
    merged.language[:] = 0
    return merged


# --------------------------------------------------------------------------- MoE options


def moe_blocks(model) -> list[tuple[torch.nn.Module, torch.nn.Module | None]]:
    """(MoE block, its router) of our MoE layers, or of a native Mixtral / Qwen2-MoE model's sparse
    blocks (router = their ``gate``)."""
    ours = moe_layers_of(model)
    if ours:
        return [(m, m.router) for m in ours.values()]
    inner = getattr(model, "module", model)
    return [
        (m, getattr(m, "gate", None)) for m in inner.modules() if type(m).__name__.endswith("SparseMoeBlock")
    ]


def apply_freeze(model, mode: str) -> int:
    """Freeze per ``--freeze`` (the classification head always trains); returns the parameters frozen."""
    if mode == "none":
        return 0
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError("freeze", mode, "the model has no MoE layers; only 'none' applies to a dense model")
    router = {id(p) for _, r in blocks if r is not None for p in r.parameters()}
    moe = {id(p) for b, _ in blocks for p in b.parameters()}
    body = {id(p) for p in model.base_model.parameters()}
    chosen = {
        "router": router,
        "experts": moe - router,
        "moe": moe,
        "non-moe": body - moe,
    }[mode]
    frozen = 0
    for p in model.parameters():
        if id(p) in chosen:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def set_aux_weights(model, cfg: FinetuneConfig) -> list[str]:
    """Apply --aux-loss-weight / --z-loss-weight to every MoE layer (and the saved config); notes."""
    changes = {
        k: getattr(cfg, k) for k in ("aux_loss_weight", "z_loss_weight") if getattr(cfg, k) is not None
    }
    if not changes:
        return []
    layers = moe_layers_of(model)
    if not layers:
        return [
            f"note: {', '.join('--' + k.replace('_', '-') for k in changes)} ignored: the model has no upcycle MoE layers"
        ]
    for m in layers.values():
        m.config = dataclasses.replace(m.config, **changes)
    model.config.moe = {**(model.config.moe or {}), **changes}
    return []


# --------------------------------------------------------------------------- one optimizer step


def forward_backward(accelerator, model, micro_batches, keys: tuple[str, ...]) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (dicts with input_ids, attention_mask, labels).

    The loss of a micro-batch is the mean cross-entropy of the logits at each row's last real token plus,
    for MoE models, the model's weighted auxiliary losses. Returns the step's sums on the device: the
    fields ``keys``, then correct predictions, examples and real tokens.
    """
    device = accelerator.device
    sums = torch.zeros(len(keys) + 3, device=device)
    for batch in micro_batches:
        ids_BS, mask_BS = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels_B = batch["labels"].to(device)
        with accelerator.accumulate(model):
            logits_BC, out = sequence_logits(model, ids_BS, mask_BS)
            task_loss = F.cross_entropy(logits_BC.float(), labels_B)
            aux = getattr(out, "aux_loss", None)
            # One backward of task + auxiliary losses: scaled alike under accumulation and DDP.
            loss = task_loss if aux is None else task_loss + aux.float()
            accelerator.backward(loss)
        with torch.no_grad():
            fields = {"loss": loss, "task_loss": task_loss}
            zero = loss.new_zeros(())
            values = [fields[k] if k in fields else getattr(out, k, None) for k in keys]
            correct = (logits_BC.argmax(-1) == labels_B).sum()
            sums += torch.stack(
                [(zero if v is None else v).detach().float() for v in values]
                + [correct.float(), zero + len(labels_B), mask_BS.sum().float()]
            )
    return sums


# --------------------------------------------------------------------------- the task


class FinetuneTask(Task):
    """Classification examples, cross-entropy at the last real token, per-language validation accuracy."""

    command = "finetune"
    run_files = ("best",)
    fixed_on_resume = FIXED_ON_RESUME
    select_key = "accuracy"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.notes: list[str] = []

    def check_sources(self) -> None:
        self.languages = resolve_languages(self.cfg)
        self.names = [str(x) for x in self.languages]

    def _load_train_splits(self) -> list:
        cfg, out = self.cfg, []
        for lang in self.languages:
            with quiet_datasets():
                ds = load_split(cfg.data, lang, cfg.train_split, field="data")
            check_fields(
                ds, cfg.text_field_list, cfg.label_field, where=f"{cfg.data} ({lang or cfg.train_split})"
            )
            out.append(ds)
        return out

    def load(self, resume_from: Path | None):
        from upcycle.data.tokenizers import load_tokenizer
        from upcycle.models.loading import load_classifier, model_source

        cfg = self.cfg
        self.train_splits = self._load_train_splits()
        self.label_names = cfg.label_name_list or label_names(self.train_splits[0], cfg.label_field)
        source = str(resume_from) if resume_from else cfg.model
        try:
            model = load_classifier(source, None if resume_from else self.label_names, flag="model")
        except UserError as exc:
            raise ConfigError("model", cfg.model, str(exc)) from exc
        tok_name = cfg.tokenizer or (str(resume_from) if resume_from else model_source(cfg.model))
        tokenizer = load_tokenizer(tok_name, model_config=model.config)
        pad_token_for(tokenizer, model)
        limit = context_length(model.config)
        if limit is not None and cfg.max_length > limit:
            raise ConfigError("max_length", cfg.max_length, f"must be ≤ the model's context length ({limit})")
        self.frozen = apply_freeze(model, cfg.freeze)
        self.notes += set_aux_weights(model, cfg)
        self.is_moe = bool(moe_layers_of(model))
        self.keys = ("loss", *MOE_TASK_LOSSES) if self.is_moe else ("loss",)
        self.description = describe_model(model, cfg.max_length)
        self.tokenizer_name = tok_name
        return model, tokenizer

    def prepare_data(self, accelerator, tokenizer, model) -> None:
        cfg = self.cfg
        self.W, self.rank = accelerator.num_processes, accelerator.process_index
        self.pad_id = model.config.pad_token_id
        fmt = PairFormat.for_tokenizer(tokenizer, cfg.max_length)
        self.format = fmt
        parts = [
            encode_split(ds, tokenizer, fmt, cfg, self.label_names, name, f"{cfg.data} ({name})")
            for ds, name in zip(self.train_splits, self.names)
        ]
        self.train_splits = None  # the encoded copy is all training needs
        self.train_set = EncodedExamples.concat(parts)
        self.batches = TrainBatches(
            self.train_set, cfg.batch_size, cfg.grad_accum * self.W, cfg.seed, cfg.group_by_length
        )
        self.eval_sets: list[EncodedExamples] = []
        if cfg.validates:
            for lang, name in zip(self.languages, self.names):
                with quiet_datasets():
                    ds = load_split(cfg.data, lang, cfg.eval_split, field="data")
                check_fields(
                    ds, cfg.text_field_list, cfg.label_field, where=f"{cfg.data} ({name}, {cfg.eval_split})"
                )
                if cfg.eval_examples is not None:
                    ds = ds.select(range(min(cfg.eval_examples, len(ds))))
                self.eval_sets.append(
                    encode_split(ds, tokenizer, fmt, cfg, self.label_names, name, f"{name} {cfg.eval_split}")
                )
            self.eval_items = [
                (li, idx)
                for li, ex in enumerate(self.eval_sets)
                for idx in eval_batches(ex, cfg.resolved_eval_batch_size)
            ]

    def total_steps(self) -> int:
        if self.cfg.steps is not None:
            return self.cfg.steps
        return max(1, math.ceil(self.cfg.epochs * self.batches.steps_per_epoch))

    def schedule(self, total: int) -> dict:
        cfg = self.cfg
        if cfg.warmup > total:
            raise ConfigError("warmup", cfg.warmup, f"must be ≤ the run's {total} steps")
        return dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, steps=total, schedule=cfg.schedule)

    def tracker_config(self) -> dict:
        out = self.cfg.resolved().to_dict()
        out.update(tokenizer=self.tokenizer_name, label_names=",".join(self.label_names))
        out["eval_every"] = self.eval_every
        return out

    def describe(self, accelerator, total: int) -> list[str]:
        cfg, W = self.cfg, self.W
        per_step = cfg.batch_size * cfg.grad_accum * W
        sizes = " + ".join(f"{n} {name}" for name, n in self._sizes(self.train_set).items())
        lines = [
            f"model: {self.description}; head: {len(self.label_names)} labels ({', '.join(self.label_names)}), "
            "classified at the last real token",
            f"data: {cfg.data} {cfg.train_split}: {sizes} = {len(self.train_set):,} examples, "
            f"{' + SEP + '.join(cfg.text_field_list)} ≤ {cfg.max_length} tokens, "
            f"{'length-grouped' if cfg.group_by_length else 'shuffled'} batches, seed {cfg.seed}; "
            f"{self.batches.steps_per_epoch:,} steps per epoch",
            "validation: "
            + (
                ", ".join(f"{s.languages[0]} ({len(s):,})" for s in self.eval_sets)
                if self.eval_sets
                else "none"
            )
            + (f", every {self.eval_every} steps" if self.eval_sets and self.eval_every else ""),
            f"effective batch: {per_step} examples = {cfg.batch_size} per process × {cfg.grad_accum} "
            f"accumulation × {W} process{'es' if W > 1 else ''}",
        ]
        if self.frozen:
            lines.append(f"frozen ({cfg.freeze}): {self.frozen / 1e6:.2f}M parameters")
        return lines + self.notes

    @staticmethod
    def _sizes(examples: EncodedExamples) -> dict[str, int]:
        counts = torch.bincount(
            torch.from_numpy(examples.language.astype("int64")), minlength=len(examples.languages)
        )
        return {lang: int(n) for lang, n in zip(examples.languages, counts.tolist())}

    # ------------------------------------------------------------------ data position
    def restore(self, state_dir: Path) -> None:
        self.batches.restore(state_dir)

    def save_state(self, state_dir: Path) -> dict:
        self.batches.save(state_dir)
        return {"epoch": self.batches.epoch, "examples": self.batches.consumed * self.cfg.batch_size}

    # ------------------------------------------------------------------ one optimizer step
    def forward_backward(self, accelerator, model) -> torch.Tensor:
        micro_batches = (
            self.train_set.batch(idx, self.pad_id) for idx in self.batches.next_step(self.rank, self.W)
        )
        return forward_backward(accelerator, model, micro_batches, self.keys)

    def record_fields(self) -> dict:
        return {
            "epoch": round(self.batches.epoch_progress, 4),
            "examples": self.batches.consumed * self.cfg.batch_size,
        }

    # ------------------------------------------------------------------ validation
    @property
    def eval_every(self) -> int:
        every = self.cfg.eval_every
        return self.batches.steps_per_epoch if every is None else every

    def evaluates(self) -> bool:
        return bool(self.eval_sets)

    def eval_due(self, step: int, total: int) -> bool:
        return bool(self.eval_every and step % self.eval_every == 0) or step == total

    def evaluate(self, accelerator, model, step: int) -> dict:
        """Accuracy and loss per train language on its validation split. Batch j goes to process j mod W;
        processes with fewer batches make weight-0 calls so all make the same number (DDP, FSDP)."""
        W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
        mine = [(item, 1.0) for item in self.eval_items[rank::W]]
        mine += [(self.eval_items[0], 0.0)] * (math.ceil(len(self.eval_items) / W) - len(mine))
        totals_L3 = torch.zeros(len(self.eval_sets), 3, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()  # dropout and router jitter off
        try:
            with torch.no_grad(), isolated_routing_stats(model) as routing:
                for (li, idx), weight in mine:
                    batch = self.eval_sets[li].batch(idx, self.pad_id)
                    labels_B = batch["labels"].to(device)
                    uncounted = isolated_routing_stats(model) if not weight else contextlib.nullcontext()
                    with uncounted:
                        logits_BC, _ = sequence_logits(
                            model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
                        )
                    if weight:
                        loss = F.cross_entropy(logits_BC.float(), labels_B, reduction="sum")
                        correct = (logits_BC.argmax(-1) == labels_B).sum()
                        totals_L3[li] += torch.stack(
                            [correct.double(), loss.double(), labels_B.new_tensor(len(labels_B)).double()]
                        )
            totals_L3 = accelerator.reduce(totals_L3, "sum")
            summary = routing_summary(routing, lambda t: accelerator.reduce(t, "sum"))
        finally:
            model.train(was_training)
        return self._eval_record(step, totals_L3.tolist(), summary)

    def _eval_record(self, step: int, totals: list[list[float]], routing: dict) -> dict:
        nan = float("nan")
        languages = {
            s.languages[0]: {"accuracy": c / n if n else nan, "loss": loss / n if n else nan, "n": int(n)}
            for s, (c, loss, n) in zip(self.eval_sets, totals)
        }
        means = {k: sum(v[k] for v in languages.values()) / len(languages) for k in ("loss", "accuracy")}
        return {
            "kind": "eval",
            "step": step,
            "split": self.cfg.eval_split,
            **means,
            "languages": languages,
            "routing": {str(k): v for k, v in routing.items()},
        }

    def format_eval(self, record: dict) -> str:
        per = " ".join(f"{lang} {v['accuracy']:.4f}" for lang, v in record["languages"].items())
        return (
            f"eval step {record['step']} ({record['split']}): accuracy {record['accuracy']:.4f} "
            f"(mean of {per}) | loss {record['loss']:.4f}"
        )


def finetune(cfg: FinetuneConfig, *, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` for classification on ``cfg.train_languages`` of ``cfg.data``.

    ``on_step(step, info)`` is called after every optimizer step (notebooks, tests).
    """
    return train(FinetuneTask(cfg), on_step=on_step)


__all__ = [
    "MOE_TASK_LOSSES",
    "FinetuneTask",
    "apply_freeze",
    "finetune",
    "forward_backward",
    "moe_blocks",
    "resolve_languages",
]
