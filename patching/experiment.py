"""The patching stage end to end (``wordpos patch`` and the ``run`` pipeline): the method named in the config
is looked up in the registry (:mod:`wordpos.patching.registry`), run, and its effects, heatmaps and the head
roles saved with the config (and the sizing policy); finished sweeps are reused and interrupted ones resume."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from wordpos.patching import registry
from wordpos.patching.results import EffectResult
from wordpos.patching.sizing import Sizing
from wordpos.probing.engines import as_engine, make_engine
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import config_identity, prepare_run_dir, read_json, write_json
from wordpos.probing.probe import WordIndexProbe
from wordpos.probing.vocab import WordVocab

log = logging.getLogger(__name__)
METRICS = ("logit_diff", "projection", "accuracy")
DIRECTIONS = ("denoising", "noising")
ABLATIONS = ("zero", "mean", "resample")
CORRUPTIONS = ("split", "merge")


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the CLI methods, from the registry
        return tuple(registry.methods(cli_only=True))
    raise AttributeError(name)


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
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}.")

    def run_sizing(self) -> Sizing:
        """The sizing policy with ``max_tokens`` (when given) as the token budget on every device."""
        if self.max_tokens is None:
            return self.sizing
        return replace(self.sizing, cpu_tokens=self.max_tokens, accelerator_tokens=self.max_tokens)

    def identity(self) -> dict[str, Any]:
        d = config_identity(self, exclude=("device", "max_tokens", "engine", "remote", "checkpoint_dir"))
        for k in ("cpu_tokens", "accelerator_tokens", "prompt_batch"):  # how fast, not what
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


@dataclass
class PatchRun:
    out: Path
    summary: dict[str, Any]
    results: dict[str, EffectResult] = field(default_factory=dict)


def load_probe(path: str | Path) -> tuple[WordIndexProbe, Path]:
    """A probe from a probe directory, a ``wordpos probe`` run directory (its best layer's probe in ``probe/``)
    or a ``wordpos run`` directory (the probe stage in ``probe/``, its best probe in ``probe/probe/``)."""
    path = Path(path)
    for cand in (path, path / "probe", path / "probe" / "probe"):
        if (cand / "probe.json").exists():
            return WordIndexProbe.load(cand), cand
    raise CorruptFileError(f"no probe at {path}: expected {path}/probe.json, {path}/probe/probe.json (a `wordpos "
                           f"probe` run) or {path}/probe/probe/probe.json (a `wordpos run` directory). Fit one with "
                           "`wordpos probe --out DIR` and pass --probe DIR.")


def _vocab_for(probe_dir: Path, tokenizer: Any, seed: int) -> WordVocab:
    """The probe run's own word split (so held-out words stay held out), else a fresh one. The probe run's
    ``dataset.json`` sits next to its best probe (``RUN/probe``) or two levels up (``RUN/probes/layerL``)."""
    for ds in (probe_dir.parent / "dataset.json", probe_dir.parent.parent / "dataset.json"):
        if ds.exists():
            meta = read_json(ds, "dataset description")
            if meta.get("vocab"):
                return WordVocab.from_dict(meta["vocab"])
    return WordVocab.build(tokenizer, seed=seed)


def _shared_scope(engine: Any, probe_dir: Path, config: PatchConfig) -> tuple[Any, ...]:
    """What the memoised pairs, contexts, datasets and roles depend on besides the keys they are stored under
    (metric and direction, prompt count): the model, the probe, the pair recipe and the sizing."""
    return (id(getattr(engine, "model", engine)), str(Path(probe_dir).resolve()), config.n_pairs, config.corruption,
            config.seed, repr(config.run_sizing()))


def run_patching(config: PatchConfig, out: str | Path, *, model: Any = None, overwrite: bool = False,
                 progress: bool = True, shared: dict[Any, Any] | None = None) -> PatchRun:
    """Run the registered method ``config.method`` for the probe in ``config.probe`` and save it into ``out``.

    ``shared`` (a dict the caller keeps, e.g. ``wordpos run`` across its four patching stages) memoises what
    stages with the same model, probe, pairs and sizing would otherwise each compute again: the pairs, the patching
    contexts (base runs), attribution patching of every head, generated datasets and the head roles. It is keyed by
    those settings, so stages that differ in them do not share."""
    out = Path(out)
    spec = registry.get(config.method)
    probe, probe_dir = load_probe(config.probe)
    prepare_run_dir(out, {"stage": "patch", **config.identity()}, overwrite=overwrite)
    if (out / "summary.json").exists() and not overwrite:
        summary = read_json(out / "summary.json", "patching summary")
        if summary.get("method") == config.method:
            return PatchRun(out=out, summary=summary)
    if probe.model and probe.model != config.model:
        raise ConfigError(f"the probe in {config.probe} was fitted on {probe.model!r}, not {config.model!r}; pass the "
                          f"matching --model or fit a probe on {config.model!r}.")
    t0 = time.perf_counter()
    engine = as_engine(model) if model is not None else make_engine(config.model, config.engine, config.device,
                                                                    config.remote)
    if probe.model is None:
        probe.model = engine.name
    vocab = _vocab_for(probe_dir, engine.tokenizer, config.seed)
    timings = {"load_s": time.perf_counter() - t0}
    summary: dict[str, Any] = {"method": config.method, "model": config.model, "probe_layer": probe.layer,
                               "sizing": config.sizing.to_dict()}
    inputs = registry.StageInputs(engine=engine, probe=probe, config=config, vocab=vocab, progress=progress, out=out)
    if shared is not None:
        inputs.cache = shared.setdefault(_shared_scope(engine, probe_dir, config), {})
    t0 = time.perf_counter()
    stage = spec.run(inputs)
    if spec.uses_pairs:
        ctx = inputs.ctx()
        summary["metric_ends"] = {"clean": ctx.metric.clean_value, "corrupted": ctx.metric.corrupted_value}
        summary["unpatched"] = ctx.unpatched
    summary.update(stage.summary)
    timings["method_s"] = time.perf_counter() - t0
    if "roles" not in inputs.cache:
        inputs.cache["roles"] = registry.get("roles").run(inputs).results["roles"]
    roles = inputs.cache["roles"]
    write_json(out / "roles.json", roles.to_dict())
    results = stage.results
    results["heads"].save(out)
    for name, res in results.items():
        if name != "heads":
            res.save(out / name)
    from wordpos.probing.plots import save_figures

    t0 = time.perf_counter()
    save_figures({k: f() if callable(f) else f for k, f in stage.figs.items()}, out)
    timings["figures_s"] = time.perf_counter() - t0
    summary["direction"] = results["heads"].direction
    summary["top_heads"] = results["heads"].top_heads(10, order=stage.rank)
    for h in summary["top_heads"]:
        h["roles"] = roles.head(h["layer"], h["index"])
        h["role"] = roles.label(h["layer"], h["index"])
    summary["timings"] = timings
    write_json(out / "summary.json", summary)
    return PatchRun(out=out, summary=summary, results=results)
