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
