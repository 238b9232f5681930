"""Head roles from attention patterns: where each head looks from word tokens, and how closely that
matches the "count from an anchor" signature of the original post (score ~3 on the last full stop,
comma or newline, ~1 on each token that starts a word since then, nothing elsewhere).

``counter_score`` is ``1 - TV(pattern, ideal)``, averaged over word tokens, where the ideal pattern scores 3 on
anchors and 1 on word-initial tokens: 1 for a perfect anchor counter, ~0 for a head that looks elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wordpos.patching.heads import parse_heads
from wordpos.patching.runner import NOOP, Request, cache_run, run_interventions
from wordpos.patching.sizing import Sizing
from wordpos.probing import hooks as H
from wordpos.probing.datasets import PromptSet
from wordpos.probing.engines import as_engine
from wordpos.probing.reprs import clipped, short_repr
from wordpos.probing.vocab import tokenizer_memo

ROLE_NAMES = ("to_anchor", "to_space", "to_prev", "to_bos", "counter_score")
ANCHOR_TEXTS = (".", ",", "\n")


def anchor_masks(tokenizer: Any) -> dict[str, Tensor]:
    """One boolean mask over the vocabulary per anchor text in ``ANCHOR_TEXTS`` (empty when the text is not
    a single token in this tokenizer)."""
    n = len(tokenizer)
    masks = {}
    for a in ANCHOR_TEXTS:
        ids = tokenizer.encode(a, add_special_tokens=False)
        mask = torch.zeros(n, dtype=torch.bool)
        if len(ids) == 1:
            mask[ids[0]] = True
        masks[a] = mask
    return masks


def token_classes(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """Boolean masks over the vocabulary: anchor tokens, and tokens that start a word (leading space).
    Remembered per tokenizer (listing a 49k-token vocabulary takes ~0.1 s; every attention statistic asks)."""
    memo = tokenizer_memo(tokenizer)
    if "token_classes" not in memo:
        toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        is_anchor = torch.stack(list(anchor_masks(tokenizer).values())).any(0)
        is_space = torch.tensor([isinstance(t, str) and t[:1] in ("Ġ", "▁", " ") for t in toks])
        memo["token_classes"] = (is_anchor, is_space)
    is_anchor, is_space = memo["token_classes"]
    return is_anchor.clone(), is_space.clone()


@dataclass
class _WordQueries:
    """One batch of prompts run to the deepest layer asked for: token ids, the attention-pattern cache, which
    keys are anchors / word starts (BOS is neither), the hypothesis' ideal pattern, and the query mask
    (tokens inside the random words)."""

    toks: Tensor
    cache: Any
    is_anchor: Tensor
    is_space: Tensor
    ideal: Tensor
    q_mask: Tensor


def _word_query_stats(engine: Any, prompts: PromptSet, layers: list[int], batch_size: int,
                      stats: Callable[[_WordQueries], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Run ``prompts`` unpatched through the runner (batches of ``batch_size``), build :class:`_WordQueries` for
    each batch and sum ``stats(batch)`` over batches (shared by the role and evidence statistics)."""
    is_anchor_v, is_space_v = token_classes(engine.tokenizer)
    names = [H.attn_pattern(L) for L in layers]
    T = prompts.max_len()
    tokens = prompts.tokens[:, :T]

    def read(out: Tensor, cache: dict[str, Tensor], P: int, sl: slice) -> dict[str, Tensor]:
        toks = tokens[sl]
        is_anchor, is_space = is_anchor_v[toks], is_space_v[toks]
        is_anchor[:, 0] = False
        is_space[:, 0] = False
        dev = out.device  # the statistics are computed where the patterns are; one copy to the host per batch
        b = _WordQueries(toks=toks.to(dev), cache=cache, is_anchor=is_anchor.to(dev), is_space=is_space.to(dev),
                         ideal=ideal_counter_pattern(is_anchor, is_space).to(dev),
                         q_mask=(prompts.word_index[sl, :T] >= 0).to(dev))
        return {k: torch.as_tensor(v, dtype=torch.float64).cpu().unsqueeze(0) for k, v in stats(b).items()}

    req = Request(tokens=tokens, read=read, stop_at_layer=max(layers) + 1, cache=names, split_prompts=True,
                  combine="sum")
    sums = run_interventions(engine, req, [NOOP], sizing=Sizing().with_prompt_batch(batch_size), progress=False,
                             desc="attention statistics")
    return {k: v[0] for k, v in sums.items()}


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


ROLES_FORMAT = "wordpos.head_roles/1"


@dataclass
class HeadRoles:
    """Per-head scores ``[layer, head]`` for each role in ``ROLE_NAMES``."""

    scores: dict[str, np.ndarray]
    n_prompts: int
    config: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        c = self.scores.get("counter_score")
        top = ""
        if c is not None and np.isfinite(c).any():
            best = np.argsort(-np.nan_to_num(c, nan=-np.inf), axis=None)[:min(3, int(np.isfinite(c).sum()))]
            top = "highest counter score: " + ", ".join(
                f"{L}.{h} {c[L, h]:.2f}" for L, h in (np.unravel_index(i, c.shape) for i in best))
        shape = "×".join(map(str, next(iter(self.scores.values())).shape)) if self.scores else "0"
        return short_repr(self, [f"{clipped(self.scores, 6)} per head [layer×head {shape}]",
                                 f"{self.n_prompts} prompts", top])

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

    def save(self, directory: str | Path, name: str = "head_roles") -> Path:
        """``{directory}/{name}.json``, atomically; returns that file's path."""
        from wordpos.probing.io import save_record

        return save_record({"format": ROLES_FORMAT, **self.to_dict()}, directory, name)

    @classmethod
    def load(cls, path: str | Path, name: str = "head_roles") -> "HeadRoles":
        """Read roles written by :meth:`save` (the ``.json`` file, or its directory)."""
        from wordpos.probing.io import load_record, record_from_dict

        def convert(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "scores": {k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()}}

        return record_from_dict(cls, load_record(path, name, "head roles"), ROLES_FORMAT, "a head-roles record",
                                "head roles", "; compute the roles again", convert)


@torch.no_grad()
def head_roles(model: Any, prompts: PromptSet, *, layers: list[int] | None = None, batch_size: int | None = None,
               max_prompts: int | None = None, sizing: Sizing | None = None) -> HeadRoles:
    """Average attention from word tokens to anchors, word-initial tokens, the previous token and BOS,
    and the counter score, for every head of ``layers`` (default: all)."""
    engine = as_engine(model)
    dims = engine.dims
    sizing = sizing or Sizing()
    batch_size, max_prompts = batch_size or sizing.role_batch, max_prompts or sizing.max_role_prompts
    from wordpos.probing.activations import parse_layers

    layers = parse_layers(layers, dims.n_layers) if layers is not None else list(range(dims.n_layers))
    prompts = prompts.subset(range(min(len(prompts), max_prompts)))

    def stats(b: _WordQueries) -> dict[str, Tensor]:
        T, dev = b.toks.shape[1], b.toks.device
        prev = torch.zeros(T, T, device=dev)
        prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
        sums = {k: torch.zeros((dims.n_layers, dims.n_heads), dtype=torch.float64, device=dev) for k in ROLE_NAMES}
        for L in layers:
            pat = b.cache[H.attn_pattern(L)].float()  # [b, head, q, k]
            per_q = {
                "to_anchor": torch.einsum("bhqk,bk->bhq", pat, b.is_anchor.float()),
                "to_space": torch.einsum("bhqk,bk->bhq", pat, b.is_space.float()),
                "to_prev": torch.einsum("bhqk,qk->bhq", pat, prev),
                "to_bos": pat[..., 0],
                "counter_score": 1 - 0.5 * (pat - b.ideal[:, None]).abs().sum(-1),
            }
            for k, v in per_q.items():
                sums[k][L] += torch.einsum("bhq,bq->h", v, b.q_mask.float()).double()
        sums["count"] = b.q_mask.sum().double()
        return sums

    got = _word_query_stats(engine, prompts, layers, batch_size, stats)
    count = float(got.pop("count"))
    sums = {k: v.numpy() for k, v in got.items()}
    scores = {k: v / max(count, 1) for k, v in sums.items()}
    return HeadRoles(scores=scores, n_prompts=len(prompts), config={"layers": layers, "anchors": list(ANCHOR_TEXTS)})


EVIDENCE_ANCHORS = {".": "to_period", ",": "to_comma", "\n": "to_newline"}  # ANCHOR_TEXTS → evidence key
EVIDENCE_KEYS = ("to_period", "to_comma", "to_newline", "to_space", "to_bos", "to_other", "anchor_vs_space_logit",
                 "counter_score")


@torch.no_grad()
def anchor_evidence(model: Any, prompts: PromptSet, heads: list[tuple[int, int]], *, batch_size: int | None = None,
                    max_prompts: int | None = None, sizing: Sizing | None = None) -> dict[str, dict[str, float]]:
    """Attention-pattern evidence for the anchor-counting hypothesis, per head (``"L.h"``), from queries
    inside the random words: mass on ``.``, ``,`` and ``\\n`` tokens separately, on word-initial tokens, on
    BOS and elsewhere, and ``anchor_vs_space_logit``: the mean of ``log(w_anchor / w_space)``, where
    ``w`` is the average weight per anchor token and per word-initial token the query sees. Within one
    softmax that log ratio *is* the score difference, so the hypothesis (score 3 on anchors, 1 on word
    starts) predicts 2.0 and ``to_other`` near 0."""
    engine = as_engine(model)
    if heads is None or len(heads) == 0:
        return {}
    heads = parse_heads(heads, engine.dims, keep_order=True)
    sizing = sizing or Sizing()
    batch_size, max_prompts = batch_size or sizing.role_batch, max_prompts or sizing.evidence_prompts
    kinds = {EVIDENCE_ANCHORS[a]: m for a, m in anchor_masks(engine.tokenizer).items()}
    prompts = prompts.subset(range(min(len(prompts), max_prompts)))
    layers = sorted({L for L, _ in heads})

    def stats(b: _WordQueries) -> dict[str, Tensor]:
        T, dev = b.toks.shape[1], b.toks.device
        masks = {k: m.to(dev)[b.toks].float() for k, m in kinds.items()}
        for m in masks.values():
            m[:, 0] = 0
        causal = torch.tril(torch.ones(T, T, device=dev))
        n_anchor = torch.einsum("qk,bk->bq", causal, b.is_anchor.float())  # anchors each query can see
        n_space = torch.einsum("qk,bk->bq", causal, b.is_space.float())
        q_mask = b.q_mask.float()
        both = q_mask * (n_anchor > 0) * (n_space > 0)
        out = {"n_q": q_mask.sum().double(), "n_ratio": both.sum().double()}
        for L, h in heads:
            pat = b.cache[H.attn_pattern(L)][:, h].float()  # [b, q, k]
            parts = {k: torch.einsum("bqk,bk->bq", pat, m) for k, m in masks.items()}
            parts["to_space"] = torch.einsum("bqk,bk->bq", pat, b.is_space.float())
            parts["to_bos"] = pat[..., 0]
            to_anchor = torch.einsum("bqk,bk->bq", pat, b.is_anchor.float())
            parts["to_other"] = 1 - to_anchor - parts["to_space"] - parts["to_bos"]
            parts["counter_score"] = 1 - 0.5 * (pat - b.ideal).abs().sum(-1)
            for k, v in parts.items():
                out[f"{L}.{h}|{k}"] = (v * q_mask).sum().double()
            eps = 1e-9
            ratio = torch.log((to_anchor / n_anchor.clamp(min=1) + eps) / (parts["to_space"] / n_space.clamp(min=1) + eps))
            out[f"{L}.{h}|anchor_vs_space_logit"] = (ratio * both).sum().double()
        return out

    got = _word_query_stats(engine, prompts, layers, batch_size, stats)
    n_q, n_ratio = float(got["n_q"]), float(got["n_ratio"])
    sums = {f"{L}.{h}": {k: float(got[f"{L}.{h}|{k}"]) for k in EVIDENCE_KEYS} for L, h in heads}
    return {key: {k: v / max(n_ratio if k == "anchor_vs_space_logit" else n_q, 1) for k, v in s.items()}
            for key, s in sums.items()}


@torch.no_grad()
def head_patterns(model: Any, prompts: PromptSet, heads: list[tuple[int, int]], index: int = 0
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Attention patterns ``[query, key]`` of ``heads`` on prompt ``index`` and its tokens (for plotting)."""
    engine = as_engine(model)
    T = int(prompts.lengths[index])
    toks = prompts.tokens[index: index + 1, :T]
    layers = sorted({L for L, _ in heads})
    _, cache = cache_run(engine, toks, [H.attn_pattern(L) for L in layers], stop_at_layer=max(layers) + 1)
    pats = {f"{L}.{h}": cache[H.attn_pattern(L)][0, h].float().cpu().numpy() for L, h in heads}
    return pats, engine.tokenizer.convert_ids_to_tokens(toks[0].tolist())
