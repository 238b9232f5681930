"""The sizing policy: every "how many" that decides the cost of a patching run, in one place, with its reason.

A :class:`Sizing` is saved in each run's ``config.json`` (``PatchConfig.sizing``) so a reader sees the numbers a
result was computed with. ``tokens_per_forward`` is the one chunking rule of the runner
(:mod:`wordpos.patching.runner`): a batched forward holds at most that many tokens, whatever the method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from wordpos.probing.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sizing:
    """How big each piece of a patching run is. Every field is a positive integer."""

    cpu_tokens: int = 4096
    """Tokens per batched forward on CPU. Cache-sized batches run fastest there: larger ones were slower per token
    in ``scripts/bench_patching.py`` on a 2-core machine."""

    accelerator_tokens: int = 1 << 18
    """Tokens per batched forward on a GPU or other accelerator, where wide batches keep the device busy."""

    prompt_batch: int = 64
    """Prompts per batch on CPU when a method reads many prompts (ablation, head means, role statistics): the runner
    folds the interventions into the batch axis next to them, as far as the token budget allows."""

    accelerator_prompts: int = 4096
    """``prompt_batch`` on a GPU or other accelerator: there a forward costs its launches and host work whatever its
    size, so a batch takes as many prompts as the token budget (``accelerator_tokens``) allows, up to this many."""

    candidates: int = 16
    """Ablation stage: when the probe's layers hold more heads than this, only the heads that attribution patching
    ranks highest are ablated one by one (SmolLM2-135M has 270 heads; a single-head sweep of all would dominate the
    run). The others are stored as NaN (not measured)."""

    audit: int = 16
    """Activation patching screened by attribution (``PatchConfig.screen="attribution"``): heads drawn at random
    from outside the attribution-ranked candidates and patched exactly, to check attribution's ranking (issue 14's
    "attribution first, exact where it matters")."""

    by_pos_heads: int = 8
    """Activation patching: the top heads (by |change|) that also get a head x position sweep."""

    role_prompts: int = 64
    """Prompts generated for the head-role statistics of a patching run (their held-out-word split is used)."""

    role_batch: int = 32
    """Prompts per forward in the role and attention-evidence statistics (attention patterns are [b, head, T, T])."""

    max_role_prompts: int = 256
    """At most this many prompts enter the role statistics (the mean settles long before)."""

    small_model_heads: int = 64
    """Pipeline: a model with at most this many heads (layers x heads) is "small" and gets the larger defaults below."""

    prompts_small: int = 2048
    """Pipeline: probe prompts for a small model."""

    prompts_large: int = 1024
    """Pipeline: probe prompts for a larger model (SmolLM2-135M)."""

    pairs_small: int = 32
    """Pipeline: clean/corrupted pairs for a small model."""

    pairs_large: int = 16
    """Pipeline: clean/corrupted pairs for a larger model."""

    ablation_prompts: int = 768
    """Pipeline: at most this many prompts for the ablation stage (its test split is scored, its train split refit)."""

    circuit_prompts: int = 1024
    """Pipeline: at most this many prompts for the circuit stage's faithfulness check."""

    evidence_prompts: int = 128
    """Pipeline: held-out prompts read by the attention-evidence stage."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Sizing.{f.name} must be a positive integer, got {v!r}; pass a whole number >= 1.")

    def tokens_per_forward(self, device: torch.device | str) -> int:
        """The token budget of one batched forward on ``device``."""
        import torch  # here, so that reading a config (``wordpos --help``) does not import torch

        return self.cpu_tokens if torch.device(device).type == "cpu" else self.accelerator_tokens

    def prompts_per_batch(self, device: torch.device | str) -> int:
        """At most this many prompts per batch on ``device`` (``prompt_batch`` / ``accelerator_prompts``)."""
        import torch

        return self.prompt_batch if torch.device(device).type == "cpu" else self.accelerator_prompts

    def with_prompt_batch(self, n: int) -> "Sizing":
        """This sizing with ``n`` prompts per batch on every device (a caller's explicit batch size)."""
        from dataclasses import replace

        return replace(self, prompt_batch=n, accelerator_prompts=n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Sizing":
        """A Sizing from a saved dict; unknown keys are refused (a typo would silently keep a default)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown sizing fields {unknown}; known fields are {sorted(known)}.")
        return cls(**d)
