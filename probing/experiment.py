"""The probing experiment end to end: dataset → residuals → probes at each layer → controls → plots,
saved in a run directory with its config. ``wordpos probe`` is a thin shell over :func:`run_probe`."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wordpos.probing.activations import Residuals, collect_residuals, parse_layers
from wordpos.probing.datasets import REFERENCE_PREFIX, DatasetConfig, WordIndexDataset
from wordpos.probing.engines import as_engine, make_engine
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.evaluation import ProbeSweep, sweep_layers
from wordpos.probing.io import (atomic_dir, check_seed, config_identity, prepare_run_dir, read_json,
                                remove_replaced_outputs, write_json)
from wordpos.probing.models import DEFAULT_MODEL
from wordpos.probing.probe import DEFAULT_SOLVER, SOLVERS, check_C

log = logging.getLogger(__name__)


CHECKPOINT_WRITE_BYTES_PER_S = 5e8
"""Assumed disk write rate when deciding whether to checkpoint the residuals of an interrupted probe stage."""


@dataclass
class ProbeConfig:
    """Settings of a probing run (saved as ``config.json``)."""

    model: str = DEFAULT_MODEL
    layers: str = "all"
    n_prompts: int = 4096
    n_words: int = 7
    seed: int = 0
    positions: str = "word_final"
    kind: str = "resid_post"
    prefixes: tuple[str, ...] = (REFERENCE_PREFIX,)
    anchors: tuple[str, ...] = ()
    anchor_prob: float = 0.0
    C: float = 1.0
    solver: str = "auto"  # "torch" (on the run's device; layers batched on an accelerator), "sklearn", or "auto" =
    # torch (same optimum within 0.5 point; on 2 idle CPU cores the organism's layer-1 fit took 0.7 s against
    # scikit-learn's 2.7-3.6 s; an earlier measurement on heavily loaded cores had favoured scikit-learn)
    batch_size: int | None = None  # None: from free device memory on an accelerator, the measured 64 on CPU
    device: str | None = None
    engine: str = "tl"
    remote: bool = False
    keep_residuals: bool = False  # keep out/checkpoint/residuals (every layer's vectors) after the stage

    def dataset_config(self) -> DatasetConfig:
        return DatasetConfig(n_prompts=self.n_prompts, n_words=self.n_words, prefixes=tuple(self.prefixes),
                             anchors=tuple(self.anchors), anchor_prob=self.anchor_prob, seed=self.seed)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the results (device, batch size and engine do not)."""
        d = config_identity(self, exclude=("device", "batch_size", "engine", "remote", "keep_residuals"))
        if d.get("solver") == "sklearn":  # runs from before the solver setting were scikit-learn fits
            d.pop("solver")
        return d

    def __post_init__(self) -> None:
        check_C(self.C)
        if self.n_words < 2:
            raise ConfigError(f"n_words must be at least 2 (a word-index probe needs two word positions to tell "
                              f"apart), got {self.n_words}; the reference experiment uses 7.")
        check_seed(self.seed)
        if self.solver not in (*SOLVERS, "auto"):
            raise ConfigError(f"solver must be one of {(*SOLVERS, 'auto')}, got {self.solver!r}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int or None (automatic), got {self.batch_size!r}.")


@dataclass
class ProbeRun:
    """What :func:`run_probe` returns: the metrics record, the fitted probes, the data and the residuals."""

    out: Path
    metrics: dict[str, Any]
    sweep: ProbeSweep | None = field(repr=False, default=None)
    dataset: WordIndexDataset | None = field(repr=False, default=None)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        return int(self.metrics["layer"])


#: what a probe run writes that a replacing run would not write over (each layer's probe, the residual checkpoint)
PROBE_OUTPUTS = ("probes", "checkpoint")


def run_probe(config: ProbeConfig, out: str | Path, *, model: Any = None, overwrite: bool = False,
              progress: bool = True, plots: bool = True) -> ProbeRun:
    """Run the probing experiment into ``out``. A finished run with the same settings is reused."""
    out = Path(out)
    config.dataset_config()  # refused settings are refused before a replaced run's files are removed
    if overwrite:  # the replaced run's layer probes and residual checkpoint: none may be read as this run's
        remove_replaced_outputs(out, "probe", PROBE_OUTPUTS)
    prepare_run_dir(out, {"stage": "probe", **config.identity()}, overwrite=overwrite, outputs=PROBE_OUTPUTS)
    if (out / "metrics.json").exists() and not overwrite:
        metrics = read_json(out / "metrics.json", "probe metrics")
        if metrics.get("model") == config.model:
            log.info("probe stage already done in %s; reusing it", out)
            return ProbeRun(out=out, metrics=metrics)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    engine = as_engine(model) if model is not None else make_engine(config.model, config.engine, config.device,
                                                                    config.remote)
    timings["load_model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = WordIndexDataset.generate(engine.tokenizer, config.dataset_config())
    timings["dataset_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    layers = parse_layers(config.layers, engine.dims.n_layers)
    ckpt = out / "checkpoint"  # residuals and fitted layers of this stage, removed when it finishes
    resid = _cached_residuals(ckpt / "residuals", layers)
    if resid is None:
        resid = collect_residuals(engine, data, layers=layers, positions=config.positions, kind=config.kind,
                                  batch_size=config.batch_size, progress=progress)
        n_tokens = int(sum(data.split(s).lengths.sum() for s in ("train", "val", "test")))
        timings["residuals_s"] = time.perf_counter() - t0
        timings["residual_tokens_per_s"] = n_tokens / max(timings["residuals_s"], 1e-9)
        # a crash-resume checkpoint is worth writing only when recomputing would cost more than writing: on a GPU
        # SmolLM2's 500 MB of residuals take ~0.3 s to collect and longer to write
        n_bytes = resid.nbytes
        if config.keep_residuals or timings["residuals_s"] > 2 * n_bytes / CHECKPOINT_WRITE_BYTES_PER_S:
            t1 = time.perf_counter()
            with atomic_dir(ckpt / "residuals") as tmp:
                resid.save(tmp)
            timings["residuals_checkpoint_s"] = time.perf_counter() - t1
        else:
            timings["residuals_checkpoint_s"] = 0.0
    else:
        log.info("reusing the residuals saved in %s by an interrupted run", ckpt)
    t0 = time.perf_counter()
    solver = config.solver if config.solver != "auto" else ("sklearn" if engine.device.type == "meta" else "torch")
    timings["solver"] = solver
    sweep = sweep_layers(resid, layers, seed=config.seed, progress=progress, C=config.C, solver=solver,
                         device=engine.device if solver == "torch" and engine.device.type != "meta" else None,
                         checkpoint_dir=ckpt / "layers")
    timings["probes_s"] = time.perf_counter() - t0
    timings.update({f"probes_{k}": v for k, v in sweep.timings.items()})  # its parts: fit, evaluate, shuffled
    name = config.model
    metrics = sweep.metrics(name)
    metrics["timings"] = timings
    best = sweep.best_layer
    sweep.probes[best].save(out / "probe")
    for L, probe in sweep.probes.items():  # every layer's probe, for patching at a layer of one's choice
        probe.save(out / "probes" / f"layer{L}")
    write_json(out / "dataset.json", data.to_dict())
    if plots:
        t0 = time.perf_counter()
        save_probe_plots(out, sweep, resid, name)
        timings["plots_s"] = time.perf_counter() - t0
    write_json(out / "metrics.json", metrics)
    if not config.keep_residuals:
        shutil.rmtree(ckpt, ignore_errors=True)
    return ProbeRun(out=out, metrics=metrics, sweep=sweep, dataset=data, timings=timings)


def _cached_residuals(directory: Path, layers: list[int]) -> Residuals | None:
    """Residuals saved by an interrupted run of this stage (same run directory, so the same config), or None."""
    if not (directory / "residuals.json").exists():
        return None
    try:
        resid = Residuals.load(directory)
    except CorruptFileError:
        return None
    return resid if resid.layers == list(layers) else None


def save_probe_plots(out: Path, sweep: ProbeSweep, resid: Any, name: str) -> None:
    from wordpos.probing.plots import confusion_heatmap, key_plot, layer_curve, save_figures

    best = sweep.best
    probe = sweep.probes[best.layer]
    pred = probe.predict(resid.test(best.layer))
    figs = {
        "key_plot": key_plot(resid.abs_pos["test"], resid.labels["test"], pred,
                             title=f"{name}: word-index probe at layer {best.layer}, held-out words<br><sup>accuracy "
                                   f"{best.accuracy:.1%} vs position-only {best.baseline_abs_pos_accuracy:.1%}; "
                                   "bars: share of predictions per true index (row) and position</sup>", as_dict=True),
        "layer_curve": layer_curve({L: r.accuracy for L, r in sweep.results.items()}, best.baseline_abs_pos_accuracy,
                                   title=f"{name}: word-index probe accuracy by layer",
                                   shuffled=best.shuffled_label_accuracy,
                                   per_layer_val={L: r.val_accuracy for L, r in sweep.results.items()}, as_dict=True),
        "confusion": confusion_heatmap(best.confusion, as_dict=True,
                                       title=f"{name}: confusion at layer {best.layer} (held-out words)"),
    }  # JSON-ready dicts (no Figures made: they are only written), as the Figures would write them
    save_figures(figs, out)


def summarize(metrics: dict[str, Any]) -> str:
    per_word = ", ".join(f"{k}:{v:.0%}" for k, v in metrics["per_word_accuracy"].items())
    return (f"{metrics['model']}: best layer {metrics['layer']} accuracy {metrics['accuracy']:.1%} on held-out words "
            f"vs position-only baseline {metrics['baseline_abs_pos_accuracy']:.1%} "
            f"(gain {metrics['gain_over_baseline'] * 100:+.1f} points); per word [{per_word}]")

