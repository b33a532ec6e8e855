"""Nexus (Gritsch et al. 2024, "Nexus: Specialization meets Adaptability for Efficiently Training Mixture
of Experts", arXiv 2408.15901): upcycle several dense models, each specialised on one data domain, into
an MoE whose router is built from domain embeddings.

Following §3 ("Upcycling dense experts as an MoE") and Fig. 2 of the paper:

- the seed model's MLP becomes the shared expert E_0 that every token goes through, "to better preserve
  the previous capabilities" (the seed is not one of the routed experts, unlike BTX);
- domain model i's MLP becomes routed expert i (``--expert NAME=DIR``, in the order given);
- the router scores token x for expert i as x · e_i with e_i = P(d_i) = W_2 · SwiGLU(W_1 · d_i), d_i the
  fixed domain embedding and P the learned projection (``router_type='embedding'``,
  :class:`upcycle.moe.router.Router`); routing is top-1 among the routed experts and the output is
  E_0(x) + p_i · E_i(x) with p_i the softmax probability (Fig. 2), i.e. ``top_k=1, renormalize=False``
  by default (any top-k and scoring may be chosen). ``--router-type linear`` gives the paper's
  "MoE (linear router)" baseline with the same experts and shared expert;
- non-MLP weights (attention, embeddings, norms, the MLPs of layers that stay dense) are averaged.
  The paper averages over the domain models (§3, "Merge Non-FFN params.": φ = Σ φ_i / n) while the
  issue behind this command asks for the domain models *and* the seed, as ``btx`` averages all its
  sources: ``--merge mean`` (default, seed included), ``experts`` (the paper's equation) or ``seed``
  (keep the seed's weights; the MoE then differs from the seed only in its MLPs).

Domain embeddings come from :mod:`upcycle.upcycling.domains` and are recorded with the checkpoint.
"""

from __future__ import annotations

import torch

from upcycle.upcycling.dense import copy_into_expert
from upcycle.upcycling.domains import embed_domains
from upcycle.upcycling.options import parse_named
from upcycle.upcycling.registry import LayerInit, Prepared, output_scale, register

#: How the checkpoint's domain embeddings are normalised (Router.set_domain_embeddings).
NORMALISATION = "unit L2 norm"


def prepare_nexus(opts, sources: list) -> Prepared:
    """Domain embeddings (embedding router), the sources to average, and the record of both."""
    from upcycle.upcycling.convert import _recorded_source

    experts = parse_named(opts.expert, "expert")
    names = list(experts)
    merge = {"mean": sources, "experts": sources[1:], "seed": sources[:1]}[opts.merge]
    # Local folders recorded absolute, as convert records its sources: `upcycle extend` reads the record
    # from wherever it runs (the recorded embedder is loaded again).
    record = {"shared_expert": _recorded_source(opts.model[0]), "merge": opts.merge}
    upcycling = {"expert_names": names, "nexus": record}
    if opts.router_type != "embedding":
        return Prepared(upcycling=upcycling, merge=merge)
    seed = sources[0]
    found = embed_domains(
        names,
        parse_named(opts.domain_data, "domain_data"),
        opts.domain_embeddings,
        (seed.model, seed.name),
        opts.embed_tokens,
        opts.domain_text_field,
    )
    record["domain_embeddings"] = {
        "normalisation": NORMALISATION,
        "size": found.size,
        "domains": found.record,
    }
    return Prepared(
        moe={"domain_embedding_size": found.size},
        upcycling=upcycling,
        merge=merge,
        data={"domain_embeddings": found.matrix(names)},
    )


@register("nexus", prepare=prepare_nexus)
@torch.no_grad()
def nexus(ctx: LayerInit) -> None:
    seed, domains = ctx.sources[0], ctx.sources[1:]
    moe = ctx.moe
    scale = output_scale(moe) if ctx.options.scaling else 1.0
    for expert, dense in zip(moe.experts, domains, strict=True):
        copy_into_expert(expert, dense, out_scale=scale)
    for shared in moe.shared_experts:
        copy_into_expert(shared, seed)
    ctx.info["shared_experts"] = "seed"
    if moe.router is not None and moe.config.router_type == "embedding":
        moe.router.set_domain_embeddings(ctx.prepared["domain_embeddings"])
    ctx.info["output_scale"] = scale
