"""The settings of a patching run (:class:`PatchConfig`), apart from the code that runs it, so that reading them
(``wordpos patch --help``, a saved ``config.json``) imports neither torch nor the methods."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from wordpos.patching import registry
from wordpos.patching.registry import ABLATIONS, CORRUPTIONS, DIRECTIONS, METRICS
from wordpos.patching.sizing import Sizing
from wordpos.probing.errors import ConfigError
from wordpos.probing.io import check_seed, config_identity


@dataclass
class PatchConfig:
    """Settings of a patching run (saved as ``config.json``, with the sizing policy)."""

    model: str = "organism"
    probe: str = ""
    method: str = "activation"
    metric: str = "logit_diff"
    direction: str = "denoising"
    n_pairs: int = 64
    corruption: str = "split"
    by_pos: bool = True
    screen: str = "exact"  # activation: "exact" (every head) or "attribution" (top candidates + a random audit)
    screen_min_rho: float = 0.9  # attribution screen: below this audit rank correlation, patch every head exactly
    ablation: str = "resample"
    top_k: int = 2
    n_random: int = 10
    n_prompts: int = 1024
    receivers: int = 6
    senders: int = 12
    seed: int = 0
    device: str | None = None
    max_tokens: int | None = None
    engine: str = "tl"
    remote: bool = False
    checkpoint_dir: str | None = None  # sweeps are keyed by their settings, so stages can share one
    sizing: Sizing = field(default_factory=Sizing)

    def __post_init__(self) -> None:
        if isinstance(self.sizing, dict):
            self.sizing = Sizing.from_dict(self.sizing)
        registry.get(self.method)  # unknown methods: ConfigError naming the registered ones
        if self.screen not in ("exact", "attribution"):
            raise ConfigError(f"screen={self.screen!r} is not one of ('exact', 'attribution').")
        for name, allowed in (("metric", METRICS), ("direction", DIRECTIONS), ("ablation", ABLATIONS),
                              ("corruption", CORRUPTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("n_pairs", "top_k", "n_prompts", "receivers", "senders"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
        if not isinstance(self.n_random, int) or self.n_random < 0:
            raise ConfigError(f"n_random must be a non-negative integer, got {self.n_random!r}.")
        check_seed(self.seed)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}.")

    def run_sizing(self) -> Sizing:
        """The sizing policy with ``max_tokens`` (when given) as the token budget on every device."""
        if self.max_tokens is None:
            return self.sizing
        return replace(self.sizing, cpu_tokens=self.max_tokens, accelerator_tokens=self.max_tokens)

    def identity(self) -> dict[str, Any]:
        d = config_identity(self, exclude=("device", "max_tokens", "engine", "remote", "checkpoint_dir"))
        for k in ("cpu_tokens", "accelerator_tokens", "prompt_batch", "accelerator_prompts"):  # how fast, not what
            d["sizing"].pop(k, None)
        return d

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PatchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown patch settings {unknown}; known settings are {sorted(known)}.")
        return cls(**d)
