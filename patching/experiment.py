"""The patching stage end to end (``wordpos patch`` and the ``run`` pipeline): the method named in the config
is looked up in the registry (:mod:`wordpos.patching.registry`), run, and its effects, heatmaps and the head
roles saved with the config (and the sizing policy); finished sweeps are reused and interrupted ones resume."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wordpos.patching import registry
from wordpos.patching.config import ABLATIONS, CORRUPTIONS, DIRECTIONS, METRICS, PatchConfig  # noqa: F401
from wordpos.patching.results import EffectResult
from wordpos.patching.sizing import Sizing  # noqa: F401 - importable from here, as before
from wordpos.probing.engines import as_engine, make_engine
from wordpos.probing.errors import ConfigError, CorruptFileError, RunDirError
from wordpos.probing.io import prepare_run_dir, read_json, write_json
from wordpos.probing.probe import WordIndexProbe
from wordpos.probing.vocab import WordVocab

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the CLI methods, from the registry (kept for callers that import it from here)
        return tuple(registry.methods(cli_only=True))
    raise AttributeError(name)


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


def probe_fingerprint(probe: WordIndexProbe) -> str:
    """SHA-256 of a fitted probe's readout (directions, bias, classes): saved with patching results, so that a
    resumed stage notices a probe re-fitted in place since."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in (probe.directions_, probe.bias_, probe.classes_):
        h.update(np.ascontiguousarray(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)).tobytes())
    return h.hexdigest()


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
    fingerprint = probe_fingerprint(probe)
    if (out / "summary.json").exists() and not overwrite:
        summary = read_json(out / "summary.json", "patching summary")
        if summary.get("method") == config.method:
            # the probe directory may hold a re-fitted probe since (the same path, so the same settings)
            if summary.get("probe_layer") != probe.layer or summary.get("probe_sha256", fingerprint) != fingerprint:
                raise RunDirError(f"{out} holds {config.method} results for another probe than {probe_dir} holds now "
                                  "(it was re-fitted since): pass --overwrite to recompute them for this probe, or "
                                  "choose a new --out directory.")
            EffectResult.load(out)  # a damaged effects file is named with the fix, not served as a finished stage
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
                               "probe_sha256": fingerprint, "sizing": config.sizing.to_dict()}
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
