"""Head roles from attention patterns: where each head looks from word tokens, and how closely that
matches the "count from an anchor" signature of the original post (score ~3 on the last full stop,
comma or newline, ~1 on each token that starts a word since then, nothing elsewhere).

````counter_score`` is ``1 - TV(pattern, ideal)``, averaged over word tokens, where the ideal pattern scores 3 on
anchors and 1 on word-initial tokens: 1 for a perfect anchor counter, ~0 for a head that looks elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probing import hooks as H
from probing.datasets import PromptSet
from probing.engine import as_engine

ROLE_NAMES = ("to_anchor", "to_space", "to_prev", "to_bos", "counter_score")
ANCHOR_TEXTS = (".", ",", "\n")


def token_classes(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """Boolean masks over the vocabulary: anchor tokens, and tokens that start a word (leading space)."""
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    anchor_ids = {tokenizer.encode(a, add_special_tokens=False)[0] for a in ANCHOR_TEXTS
                  if len(tokenizer.encode(a, add_special_tokens=False)) == 1}
    is_anchor = torch.zeros(n, dtype=torch.bool)
    is_anchor[list(anchor_ids)] = True
    is_space = torch.tensor([isinstance(t, str) and t[:1] in ("Ġ", "▁", " ") for t in toks])
    return is_anchor, is_space


def ideal_counter_pattern(is_anchor: Tensor, is_space: Tensor, anchor_score: float = 3.0,
                          space_score: float = 1.0) -> Tensor:
    """The post's hypothesised pattern ``[batch, q, k]``, literally: softmax of 3 on every anchor token, 1 on
    every word-initial token, -inf elsewhere (causal). Its value-weighted sum of "starts a word" is
    ``n·e / (a·e³ + n·e)``: a count of words that an anchor nearby dominates and that saturates with
    distance, as the post predicts. Queries with nothing to attend to put all weight on BOS."""
    B, T = is_anchor.shape
    idx = torch.arange(T)
    k, q = idx[None, None, :], idx[None, :, None]
    causal = k <= q
    scores = torch.full((B, T, T), float("-inf"))
    scores = torch.where(causal & is_anchor[:, None, :], torch.tensor(anchor_score), scores)
    scores = torch.where(causal & is_space[:, None, :], torch.tensor(space_score), scores)
    none = torch.isinf(scores).all(-1, keepdim=True)
    scores = torch.where(none & (k == 0), torch.tensor(0.0), scores)
    return torch.softmax(scores, dim=-1)


@dataclass
class HeadRoles:
    """Per-head scores ``[layer, head]`` for each role in ``ROLE_NAMES``."""

    scores: dict[str, np.ndarray]
    n_prompts: int
    config: dict[str, Any] = field(default_factory=dict)

    def head(self, layer: int, head: int) -> dict[str, float]:
        return {k: float(v[layer, head]) for k, v in self.scores.items()}

    def label(self, layer: int, head: int) -> str:
        """A short human label for the head's dominant role."""
        r = self.head(layer, head)
        if r["counter_score"] > 0.8:  # a causal average scores ~0.55 on the reference prompts
            return "anchor counter"
        best = max(("to_anchor", "to_space", "to_prev", "to_bos"), key=lambda k: r[k])
        return {"to_anchor": "anchor", "to_space": "word starts", "to_prev": "previous token", "to_bos": "BOS"}[best]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": {k: v.tolist() for k, v in self.scores.items()}, "n_prompts": self.n_prompts,
                "config": self.config}


@torch.no_grad()
def head_roles(model: Any, prompts: PromptSet, *, layers: list[int] | None = None, batch_size: int = 32,
               max_prompts: int = 256) -> HeadRoles:
    """Average attention from word tokens to anchors, word-initial tokens, the previous token and BOS,
    and the counter score, for every head of ``layers`` (default: all)."""
    engine = as_engine(model)
    dims = engine.dims
    layers = layers if layers is not None else list(range(dims.n_layers))
    is_anchor_v, is_space_v = token_classes(engine.tokenizer)
    prompts = prompts.subset(range(min(len(prompts), max_prompts)))
    names = [H.attn_pattern(L) for L in layers]
    sums = {k: np.zeros((dims.n_layers, dims.n_heads)) for k in ROLE_NAMES}
    count = 0
    for b0 in range(0, len(prompts), batch_size):
        sub = prompts.subset(range(b0, min(b0 + batch_size, len(prompts))))
        T = sub.max_len()
        toks = sub.tokens[:, :T]
        _, cache = engine.run(toks.to(engine.device), cache=names, stop_at_layer=max(layers) + 1)
        is_anchor, is_space = is_anchor_v[toks], is_space_v[toks]
        is_anchor[:, 0] = False
        is_space[:, 0] = False
        ideal = ideal_counter_pattern(is_anchor, is_space)
        q_mask = (sub.word_index[:, :T] >= 0)  # queries: tokens inside the random words
        nq = q_mask.sum()
        prev = torch.zeros(T, T)
        prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
        for L, n in zip(layers, names):
            pat = cache[n].float().cpu()  # [b, head, q, k]
            stats = {
                "to_anchor": torch.einsum("bhqk,bk->bhq", pat, is_anchor.float()),
                "to_space": torch.einsum("bhqk,bk->bhq", pat, is_space.float()),
                "to_prev": torch.einsum("bhqk,qk->bhq", pat, prev),
                "to_bos": pat[..., 0],
                "counter_score": 1 - 0.5 * (pat - ideal[:, None]).abs().sum(-1),
            }
            for k, v in stats.items():
                sums[k][L] += torch.einsum("bhq,bq->h", v, q_mask.float()).numpy()
        count += int(nq)
    scores = {k: v / max(count, 1) for k, v in sums.items()}
    return HeadRoles(scores=scores, n_prompts=len(prompts), config={"layers": layers, "anchors": list(ANCHOR_TEXTS)})


EVIDENCE_KEYS = ("to_period", "to_comma", "to_newline", "to_space", "to_bos", "to_other", "anchor_vs_space_logit",
                 "counter_score")


@torch.no_grad()
def anchor_evidence(model: Any, prompts: PromptSet, heads: list[tuple[int, int]], *, batch_size: int = 32,
                    max_prompts: int = 128) -> dict[str, dict[str, float]]:
    """Attention-pattern evidence for the anchor-counting hypothesis, per head (``"L.h"``), from queries
    inside the random words: mass on ``.``, ``,`` and ``\\n`` tokens separately, on word-initial tokens, on
    BOS and elsewhere, and ``anchor_vs_space_logit``: the mean of ``log(w_anchor / w_space)``, where
    ``w`` is the average weight per anchor token and per word-initial token the query sees. Within one
    softmax that log ratio *is* the score difference, so the hypothesis (score 3 on anchors, 1 on word
    starts) predicts 2.0 and ``to_other`` near 0."""
    engine = as_engine(model)
    if not heads:
        return {}
    for L, h in heads:
        engine.dims.check_head(L, h)
    tok = engine.tokenizer
    n_vocab = len(tok)
    kinds = {}
    for key, text in (("to_period", "."), ("to_comma", ","), ("to_newline", "\n")):
        ids = tok.encode(text, add_special_tokens=False)
        mask = torch.zeros(n_vocab, dtype=torch.bool)
        if len(ids) == 1:
            mask[ids[0]] = True
        kinds[key] = mask
    is_anchor_v, is_space_v = token_classes(tok)
    prompts = prompts.subset(range(min(len(prompts), max_prompts)))
    layers = sorted({L for L, _ in heads})
    names = {L: H.attn_pattern(L) for L in layers}
    sums = {f"{L}.{h}": dict.fromkeys(EVIDENCE_KEYS, 0.0) for L, h in heads}
    n_q, n_ratio = 0, {k: 0 for k in sums}
    for b0 in range(0, len(prompts), batch_size):
        sub = prompts.subset(range(b0, min(b0 + batch_size, len(prompts))))
        T = sub.max_len()
        toks = sub.tokens[:, :T]
        _, cache = engine.run(toks.to(engine.device), cache=list(names.values()), stop_at_layer=max(layers) + 1)
        masks = {k: m[toks].float() for k, m in kinds.items()}
        is_anchor, is_space = is_anchor_v[toks].clone(), is_space_v[toks].clone()
        for m in (is_anchor, is_space, *masks.values()):
            m[:, 0] = 0
        bos = torch.zeros_like(is_space, dtype=torch.float)
        bos[:, 0] = 1.0
        ideal = ideal_counter_pattern(is_anchor, is_space)
        causal = torch.tril(torch.ones(T, T))
        n_anchor = torch.einsum("qk,bk->bq", causal, is_anchor.float())  # anchors each query can see
        n_space = torch.einsum("qk,bk->bq", causal, is_space.float())
        q_mask = (sub.word_index[:, :T] >= 0).float()
        both = q_mask * (n_anchor > 0) * (n_space > 0)
        n_q += int(q_mask.sum())
        for L, h in heads:
            pat = cache[names[L]][:, h].float().cpu()  # [b, q, k]
            parts = {k: torch.einsum("bqk,bk->bq", pat, m) for k, m in masks.items()}
            parts["to_space"] = torch.einsum("bqk,bk->bq", pat, is_space.float())
            parts["to_bos"] = pat[..., 0]
            to_anchor = torch.einsum("bqk,bk->bq", pat, is_anchor.float())
            parts["to_other"] = 1 - to_anchor - parts["to_space"] - parts["to_bos"]
            parts["counter_score"] = 1 - 0.5 * (pat - ideal).abs().sum(-1)
            s = sums[f"{L}.{h}"]
            for k, v in parts.items():
                s[k] += float((v * q_mask).sum())
            eps = 1e-9
            ratio = torch.log((to_anchor / n_anchor.clamp(min=1) + eps) / (parts["to_space"] / n_space.clamp(min=1) + eps))
            s["anchor_vs_space_logit"] += float((ratio * both).sum())
            n_ratio[f"{L}.{h}"] += int(both.sum())
    out = {}
    for key, s in sums.items():
        out[key] = {k: (v / max(n_ratio[key], 1) if k == "anchor_vs_space_logit" else v / max(n_q, 1))
                    for k, v in s.items()}
    return out


@torch.no_grad()
def head_patterns(model: Any, prompts: PromptSet, heads: list[tuple[int, int]], index: int = 0
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Attention patterns ``[query, key]`` of ``heads`` on prompt ``index`` and its tokens (for plotting)."""
    engine = as_engine(model)
    T = int(prompts.lengths[index])
    toks = prompts.tokens[index: index + 1, :T]
    layers = sorted({L for L, _ in heads})
    _, cache = engine.run(toks.to(engine.device), cache=[H.attn_pattern(L) for L in layers],
                          stop_at_layer=max(layers) + 1)
    pats = {f"{L}.{h}": cache[H.attn_pattern(L)][0, h].float().cpu().numpy() for L, h in heads}
    return pats, engine.tokenizer.convert_ids_to_tokens(toks[0].tolist())
