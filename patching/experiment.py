"""The patching stage end to end (``wordpos patch`` and the ``run`` pipeline): pairs → method → effects,
heatmaps, head roles, saved with the config; finished sweeps are reused and interrupted ones resume."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patching.ablation import ablate_heads, ablated_predictions, ablation_sweep
from patching.activation import patch_heads, patch_layer_outputs, patch_resid, prepare
from patching.attribution import attribute_heads, correlation
from patching.corruptions import make_pairs
from patching.path import path_patch_direct, path_patch_edges
from patching.plots import head_heatmap, position_heatmap
from patching.results import EffectResult
from patching.roles import head_roles
from probing.datasets import DatasetConfig, WordIndexDataset
from probing.engine import as_engine, make_engine
from probing.errors import ConfigError, CorruptFileError
from probing.io import config_identity, prepare_run_dir, read_json, write_json
from probing.probe import WordIndexProbe
from probing.vocab import WordVocab

log = logging.getLogger(__name__)
METHODS = ("activation", "path", "attribution", "ablation")


@dataclass
class PatchConfig:
    """Settings of a patching run (saved as ``config.json``)."""

    model: str = "organism"
    probe: str = ""
    method: str = "activation"
    metric: str = "logit_diff"
    direction: str = "denoising"
    n_pairs: int = 64
    corruption: str = "split"
    by_pos: bool = True
    ablation: str = "resample"
    top_k: int = 2
    n_random: int = 10
    n_prompts: int = 1024
    receivers: int = 6
    senders: int = 12
    by_pos_heads: int = 8
    candidates: int = 16
    seed: int = 0
    device: str | None = None
    max_tokens: int | None = None
    engine: str = "tl"
    remote: bool = False
    checkpoint_dir: str | None = None  # sweeps are keyed by their settings, so stages can share one

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")

    def identity(self) -> dict[str, Any]:
        return config_identity(self, exclude=("device", "max_tokens", "engine", "remote", "checkpoint_dir"))


@dataclass
class PatchRun:
    out: Path
    summary: dict[str, Any]
    results: dict[str, EffectResult] = field(default_factory=dict)


def load_probe(path: str | Path) -> tuple[WordIndexProbe, Path]:
    """A probe from a probe directory or a run directory holding ``probe/``."""
    path = Path(path)
    for cand in (path, path / "probe"):
        if (cand / "probe.json").exists():
            return WordIndexProbe.load(cand), cand
    raise CorruptFileError(f"no probe at {path}: expected {path}/probe.json or {path}/probe/probe.json. Fit one with "
                           "`wordpos probe --out DIR` and pass --probe DIR.")


def _vocab_for(probe_dir: Path, tokenizer: Any, seed: int) -> WordVocab:
    """The probe run's own word split (so held-out words stay held out), else a fresh one."""
    ds = probe_dir.parent / "dataset.json"
    if ds.exists():
        meta = read_json(ds, "dataset description")
        if meta.get("vocab"):
            return WordVocab.from_dict(meta["vocab"])
    return WordVocab.build(tokenizer, seed=seed)


def run_patching(config: PatchConfig, out: str | Path, *, model: Any = None, overwrite: bool = False,
                 progress: bool = True) -> PatchRun:
    """Run one patching method for the probe in ``config.probe`` and save it into ``out``."""
    out = Path(out)
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
    n_words = len(probe.classes_)
    timings = {"load_s": time.perf_counter() - t0}
    summary: dict[str, Any] = {"method": config.method, "model": config.model, "probe_layer": probe.layer}
    results: dict[str, EffectResult] = {}
    figs = {}
    t0 = time.perf_counter()
    if config.method == "ablation":
        data = WordIndexDataset.generate(engine.tokenizer, DatasetConfig(n_prompts=config.n_prompts, n_words=n_words,
                                                                         seed=config.seed), vocab=vocab)
        n_before = (int(probe.layer) + 1) * engine.dims.n_heads
        candidates = None
        if config.candidates < n_before:  # big models: ablate the heads attribution patching ranks highest
            pairs = make_pairs(engine.tokenizer, config.n_pairs, vocab=vocab, words="test", kind=config.corruption,
                               n_words=n_words, seed=config.seed)
            att = attribute_heads(engine, prepare(engine, pairs, probe, metric="logit_diff"))
            candidates = [(h["layer"], h["index"]) for h in att.top_heads(config.candidates)]
        acc = ablation_sweep(engine, probe, data, method=config.ablation, heads=candidates, seed=config.seed,
                             progress=progress)
        clean = float(np.mean(ablated_predictions(engine, probe, data.test, [], "zero") == data.test.labels.numpy()))
        res = EffectResult(np.nan_to_num(clean - acc, nan=0.0), ("layer", "head"), "ablation",
                           f"probe_accuracy_drop ({config.ablation})", direction="ablation", n_prompts=len(data.test),
                           config={**config.identity(), "clean_accuracy": clean,
                                   "candidates": None if candidates is None else [f"{L}.{h}" for L, h in candidates]})
        results["heads"] = res
        top = [(h["layer"], h["index"]) for h in res.top_heads(config.top_k, by_abs=False)]
        ab = ablate_heads(engine, probe, data, top, method=config.ablation, n_random=config.n_random, seed=config.seed,
                          progress=progress)
        write_json(out / "ablation.json", ab.to_dict())
        summary["top_k_ablation"] = ab.to_dict()
        figs["heads"] = head_heatmap(res.effects, f"{config.model}: probe accuracy drop when each head is "
                                                  f"{config.ablation}-ablated (layer {probe.layer} probe)", "accuracy drop")
    else:
        pairs = make_pairs(engine.tokenizer, config.n_pairs, vocab=vocab, words="test", kind=config.corruption,
                           n_words=n_words, seed=config.seed)
        ctx = prepare(engine, pairs, probe, metric=config.metric, direction=config.direction)
        summary["metric_ends"] = {"clean": ctx.metric.clean_value, "corrupted": ctx.metric.corrupted_value}
        kw = dict(progress=progress)
        ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else out / "checkpoints"
        label = f"{config.model}, {config.direction}, {ctx.metric.name}, {len(pairs)} pairs"
        if config.method == "activation":
            results["heads"] = patch_heads(engine, ctx, max_tokens=config.max_tokens,
                                           checkpoint_dir=ckpt, **kw)
            results["resid"] = patch_resid(engine, ctx, max_tokens=config.max_tokens, checkpoint_dir=ckpt,
                                           **kw)
            results["mlp"] = patch_layer_outputs(engine, ctx, site="mlp_out", **kw)
            if config.by_pos:  # per-position detail for the heads that matter
                top = [(h["layer"], h["index"]) for h in results["heads"].top_heads(config.by_pos_heads)]
                results["heads_by_pos"] = patch_heads(engine, ctx, by_pos=True, heads=top, max_tokens=config.max_tokens,
                                                      checkpoint_dir=ckpt, **kw)
            tokens = engine.tokenizer.convert_ids_to_tokens(ctx.base[0].tolist())
            figs["resid"] = position_heatmap(results["resid"].effects, f"Residual-stream patching ({label})", tokens)
        elif config.method == "attribution":
            results["heads"] = attribute_heads(engine, ctx)
            act = patch_heads(engine, ctx, max_tokens=config.max_tokens, checkpoint_dir=ckpt, **kw)
            results["activation_heads"] = act
            summary["correlation_with_activation"] = correlation(results["heads"], act)
        elif config.method == "path":
            direct = path_patch_direct(engine, ctx, max_tokens=config.max_tokens, **kw)
            results["heads"] = direct
            act = patch_heads(engine, ctx, max_tokens=config.max_tokens, checkpoint_dir=ckpt, **kw)
            results["activation_heads"] = act
            ranked = [(h["layer"], h["index"]) for h in act.top_heads(config.receivers)]
            receivers = [(L, h) for L, h in ranked if L > 0] or None
            senders = [(h["layer"], h["index"]) for h in act.top_heads(config.senders)]
            senders = [s for s in senders if receivers and s[0] < max(L for L, _ in receivers)]
            if receivers and senders:
                results["edges"] = path_patch_edges(engine, ctx, receivers=receivers, senders=senders,
                                                    max_tokens=config.max_tokens, **kw)
        figs["heads"] = head_heatmap(results["heads"].head_effects(),
                                     f"{config.method.capitalize()} patching of heads ({label})",
                                     "normalised effect")
    timings["method_s"] = time.perf_counter() - t0
    roles = head_roles(engine, WordIndexDataset.generate(
        engine.tokenizer, DatasetConfig(n_prompts=64, n_words=n_words, seed=config.seed), vocab=vocab).test,
        layers=list(range(int(probe.layer) + 1)))
    write_json(out / "roles.json", roles.to_dict())
    results["heads"].save(out)
    for name, res in results.items():
        if name != "heads":
            res.save(out / name)
    from probing.plots import save_figures

    save_figures(figs, out)
    summary["top_heads"] = results["heads"].top_heads(10, by_abs=config.method != "ablation")
    for h in summary["top_heads"]:
        h["roles"] = roles.head(h["layer"], h["index"])
        h["role"] = roles.label(h["layer"], h["index"])
    summary["timings"] = timings
    write_json(out / "summary.json", summary)
    return PatchRun(out=out, summary=summary, results=results)

