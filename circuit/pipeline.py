"""``wordpos run``: the whole experiment in one command, stage by stage, each stage saved and reused.

probe at every layer → activation + attribution patching at the best layer → path patching → ablation
of the top heads (with a random-heads control) → the edge circuit (EAP-IG edge scores, the faithfulness curve
against random circuits under counterfactual ablation, the smallest circuit reaching the target) → attention
evidence → ``report.html`` and ``summary.json``. An interrupted run resumes: finished stages are read back from disk.
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wordpos.patching.heads import parse_heads
from wordpos.patching.experiment import PatchConfig, load_probe, run_patching
from wordpos.patching.results import EffectResult
from wordpos.patching.sizing import Sizing
from wordpos.probing.errors import ConfigError
from wordpos.probing.experiment import ProbeConfig, run_probe
from wordpos.probing.io import (check_seed, config_identity, prepare_run_dir, read_json, remove_replaced_outputs,
                                write_json)
from wordpos.probing.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Settings of ``wordpos run`` (saved as ``config.json``); defaults are sized for a 2-core CPU."""

    model: str = DEFAULT_MODEL
    n_prompts: int | None = None  # None: sized to the model (see ``sized``)
    n_pairs: int | None = None
    top_k: int = 2
    n_random: int = 10
    receivers: int = 4
    keep: float = 0.95
    threshold: float | None = None
    circuit_top_k: int | None = None
    circuit: str = "edges"  # "edges" (EAP-IG edge circuit, faithfulness curve) or "heads" (former path-patching graph)
    circuit_scores: str = "eap-ig"
    circuit_ablation: str = "counterfactual"
    circuit_target: float = 0.8
    circuit_steps: int = 5
    circuit_n_random: int = 3
    dtype: str = "float32"
    screen: str = "attribution"  # activation patching: attribution-ranked candidates + a random audit, exact
    # patching of every head only when the audit's rank correlation is below 0.9 ("exact": always every head)
    sizing: Sizing = field(default_factory=Sizing)  # every "how many" with its reason (wordpos.patching.sizing)
    layer: int | None = None
    seed: int = 0
    device: str | None = None
    engine: str = "tl"
    remote: bool = False
    png: bool = False  # also PNG copies of every figure, in one kaleido batch at the end (needs Chromium; ~4 s to
    # start it on 2 CPU cores, then ~0.3 s per figure); the HTML figures and report.html are always written

    def __post_init__(self) -> None:
        from wordpos.probing.errors import ConfigError

        if isinstance(self.sizing, dict):
            self.sizing = Sizing.from_dict(self.sizing)

        choices = {"circuit": ("edges", "heads"), "circuit_scores": ("eap", "eap-ig", "exact"),
                   "circuit_ablation": ("counterfactual", "mean", "resample"),
                   "dtype": ("float32", "bfloat16", "float16"), "screen": ("exact", "attribution")}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {ok}.")
        for name in ("n_prompts", "n_pairs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, numbers.Integral) or v < 1):
                raise ConfigError(f"{name} must be a positive integer (leave it out to size it to the model); got {v!r}.")
        check_seed(self.seed)
        from wordpos.circuit.prune import check_prune_settings  # the head-level circuit's, before any stage runs

        check_prune_settings(threshold=self.threshold, top_k=self.circuit_top_k, keep=self.keep)
        if not 0 < self.circuit_target <= 1:
            raise ConfigError(f"circuit_target is a faithfulness in (0, 1], got {self.circuit_target}.")
        if self.circuit_steps < 1 or self.circuit_n_random < 0 or self.top_k < 1 or self.n_random < 0:
            raise ConfigError("need circuit_steps >= 1, circuit_n_random >= 0, top_k >= 1 and n_random >= 0; got "
                              f"{self.circuit_steps}, {self.circuit_n_random}, {self.top_k}, {self.n_random}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A config from a saved ``config.json`` (unknown keys, e.g. ``stage``, are ignored)."""
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def sized(self, n_layers: int, n_heads: int) -> "RunConfig":
        """Defaults from the sizing policy: ``prompts_small``/``pairs_small`` (2048/32) for models with at most
        ``small_model_heads`` (64) heads, ``prompts_large``/``pairs_large`` (1024/16) for bigger ones (SmolLM2-135M:
        270 heads)."""
        z = self.sizing
        small = n_layers * n_heads <= z.small_model_heads
        from dataclasses import replace

        return replace(self, n_prompts=self.n_prompts if self.n_prompts is not None else
                       (z.prompts_small if small else z.prompts_large),
                       n_pairs=self.n_pairs if self.n_pairs is not None else (z.pairs_small if small else z.pairs_large))

    def identity(self) -> dict[str, Any]:
        d = config_identity(self, exclude=("device", "engine", "remote", "png"))
        # how fast, not what; and a field added after runs were saved with this identity: left out, so that those
        # run directories still resume
        d["sizing"].pop("accelerator_prompts", None)
        return d


#: what ``wordpos run`` writes into its directory: the stages' folders, the sweeps' checkpoints, summary and report
RUN_OUTPUTS = ("probe", "patch_activation", "patch_attribution", "patch_path", "patch_ablation", "circuit",
               "attention", "checkpoints", "summary.json", "report.html")


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _stage(name: str, timings: dict[str, float], progress: bool, marker: Path | None = None,
           computed: dict[str, float] | None = None, overwrite: bool = False):
    """Time a stage into ``timings`` (this invocation). ``computed`` keeps what each stage cost when it was
    actually computed: a stage whose ``marker`` file already existed is read back, so its earlier cost stays."""
    class _T:
        def __enter__(self):
            self.reused = marker is not None and marker.exists() and not overwrite
            if progress:
                print(f"[wordpos run] {name} ...{' (reusing saved results)' if self.reused else ''}", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 2)
            if computed is not None and (not self.reused or name not in computed):
                computed[name] = timings[name]
            if progress and exc[0] is None:
                print(f"[wordpos run] {name} done in {timings[name]:.1f} s", flush=True)

    return _T()


def run_pipeline(config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                 model: Any = None) -> RunResult:
    """Run every stage into ``out`` (``out/probe``, ``out/patch_*``, ``out/ablation``, ``out/circuit``)."""
    from wordpos.probing.plots import deferred_images

    with deferred_images(config.png) as images:
        return _run_pipeline(config, out, overwrite=overwrite, progress=progress, model=model, images=images)


def _run_pipeline(config: RunConfig, out: str | Path, *, overwrite: bool, progress: bool, model: Any,
                  images: Any) -> RunResult:
    from wordpos.probing.engines import as_engine, make_engine

    out = Path(out)
    timings: dict[str, float] = {}
    with _stage("load model", timings, progress):
        model = model if model is not None else make_engine(config.model, config.engine, config.device, config.remote,
                                                            dtype=config.dtype)
    dims = as_engine(model).dims
    config = config.sized(dims.n_layers, dims.n_heads)
    probe_config = ProbeConfig(model=config.model, layers="all", n_prompts=config.n_prompts, seed=config.seed,
                               device=config.device)
    probe_config.dataset_config()  # the settings refused later are refused now, before a replaced run is removed
    if config.layer is not None:
        dims.check_layer(config.layer, "--layer")
    if overwrite:
        remove_replaced_outputs(out, "run", RUN_OUTPUTS)
    prepare_run_dir(out, {"stage": "run", **config.identity()}, overwrite=overwrite, outputs=RUN_OUTPUTS)
    old = out / "summary.json"
    prev = read_json(old, "run summary") if old.exists() and not overwrite else {}
    computed: dict[str, float] = dict(prev.get("compute_s", prev.get("timings_s", {})))  # older runs: timings_s
    computed["load model"] = timings["load model"]
    kw = dict(computed=computed, overwrite=overwrite)
    edges_refused = None  # why edge patching would be wrong on this model (None: it is right)
    if config.circuit == "edges" and config.engine == "tl":
        # the edge circuit's modules (networkx among them, for its GEXF/GraphML exports) load here, before the
        # stages, as the patching stages' modules load with this module; timed on their own, not in the circuit's
        with _stage("circuit imports", timings, progress, computed=computed):
            from wordpos.circuit.edge_circuit import load_stage_modules

            load_stage_modules()
        # and the model is checked for it (one short forward, cached per model), as the model is loaded: a check of
        # the model, not circuit work
        with _stage("edge check", timings, progress, computed=computed):
            from wordpos.probing.engines.split_inputs import split_inputs_unsupported

            edges_refused = split_inputs_unsupported(as_engine(model))
    with _stage("probe (all layers)", timings, progress, out / "probe" / "metrics.json", **kw):
        probe_run = run_probe(probe_config, out / "probe", model=model, overwrite=overwrite, progress=progress)
    metrics = probe_run.metrics
    probe_path = out / "probe" if config.layer is None else out / "probe" / "probes" / f"layer{config.layer}"
    if config.layer is not None and not (probe_path / "probe.json").exists():
        from wordpos.probing.errors import ConfigError

        raise ConfigError(f"layer {config.layer} has no probe in {out / 'probe'}; layers run: "
                          f"{sorted(metrics['per_layer_accuracy'])}.")
    common = dict(model=config.model, probe=str(probe_path), n_pairs=config.n_pairs, seed=config.seed,
                  device=config.device, top_k=config.top_k, n_random=config.n_random, receivers=config.receivers,
                  n_prompts=min(config.n_prompts, config.sizing.ablation_prompts), checkpoint_dir=str(out / "checkpoints"),
                  sizing=config.sizing, screen=config.screen)
    stages, shared = {}, {}  # shared: pairs, base runs, attribution, datasets and head roles the four stages have in common
    for method in ("activation", "attribution", "path", "ablation"):
        with _stage(f"{method} patching" if method != "ablation" else "ablation", timings, progress,
                    out / f"patch_{method}" / "summary.json", **kw):
            stages[method] = run_patching(PatchConfig(method=method, **common), out / f"patch_{method}",
                                          model=model, overwrite=overwrite, progress=progress, shared=shared)
    del shared
    with _stage("circuit", timings, progress, out / "circuit" / "circuit.json", **kw):
        edges = config.circuit == "edges"
        why = None
        if edges and config.engine != "tl":  # per-head reader inputs exist on the TransformerLens engine only
            why = (f"the edge circuit needs per-head q/k/v reader inputs, which only the TransformerLens engine has; "
                   f"with --engine {config.engine}")
        elif edges and edges_refused is not None:
            why = edges_refused + ";"
        notes = []
        if why is not None:
            edges = False
            notes.append(f"{why} the run draws the head-level path-patching circuit instead")
        if not overwrite:
            notes.append(check_resumed_circuit(out / "circuit", dims.parallel_attn_mlp, edges_refused, edges))
        for msg in filter(None, notes):
            log.warning(msg)
            if progress:
                print(f"[wordpos run] note: {msg}", flush=True)
        if edges:
            circuit_summary = edge_circuit_run_stage(config, out, model=model, overwrite=overwrite,
                                                     probe_path=probe_path, progress=progress)
        else:
            circuit_summary = build_circuit_stage(config, out, model=model, overwrite=overwrite, probe_path=probe_path)
    with _stage("attention evidence", timings, progress, out / "attention" / "evidence.json", **kw):
        heads = _evidence_heads(stages, circuit_summary)
        attention = attention_stage(config, out, heads, model=model, overwrite=overwrite, probe_path=probe_path,
                                    n_prompts=config.sizing.evidence_prompts)
    summary = {
        "model": config.model,
        "patched_layer": int(load_probe(probe_path)[0].layer),
        "probe": {k: metrics[k] for k in ("layer", "accuracy", "baseline_abs_pos_accuracy", "gain_over_baseline",
                                          "shuffled_label_accuracy", "per_word_accuracy", "per_layer_accuracy",
                                          "n_train", "n_test")},
        "top_heads": {m: stages[m].summary["top_heads"][:5] for m in stages},
        "attribution_vs_activation_correlation": stages["attribution"].summary.get("correlation_with_activation"),
        "activation_screen": stages["activation"].summary.get("screen"),
        "ablation": stages["ablation"].summary.get("top_k_ablation"),
        "circuit": circuit_summary,
        "attention": attention,
        "timings_s": timings,
        "compute_s": computed,
    }
    if images.jobs:
        with _stage(f"PNG figures ({len(images.jobs)})", timings, progress, computed=computed):
            images.flush()
    write_json(out / "summary.json", summary)
    with _stage("report", timings, progress, computed=computed):
        from wordpos.circuit.report import write_report

        write_report(out, summary)
    summary["timings_s"] = timings
    summary["compute_s"] = computed
    summary["compute_total_s"] = round(sum(computed.values()), 1)
    write_json(out / "summary.json", summary)
    return RunResult(out=out, summary=summary, timings=timings)


def _evidence_heads(stages: dict[str, Any], circuit_summary: dict[str, Any], n_top: int = 6,
                    max_heads: int = 9) -> list[tuple[int, int]]:
    """Heads whose attention patterns the report shows, most important first: the top activation-patching
    heads, the ablated top-k, then the circuit's (at most ``max_heads``; returned sorted by layer)."""
    names = [h["head"] for h in stages["activation"].summary["top_heads"][:n_top]]
    names += [f"{L}.{h}" for L, h in (stages["ablation"].summary.get("top_k_ablation") or {}).get("heads", [])]
    names += list(circuit_summary.get("heads", []))
    return parse_heads(list(dict.fromkeys(names))[:max_heads]) if names else []


def _stage_inputs(config: RunConfig, out: Path, model: Any, probe_path: Path | None, n_prompts: int
                  ) -> tuple[Any, Any, Any]:
    """The probe, the engine and a fresh dataset over the probe run's own word split (held-out words stay
    held out), as the circuit and attention stages need them."""
    from wordpos.patching.experiment import _vocab_for
    from wordpos.probing.datasets import DatasetConfig, WordIndexDataset
    from wordpos.probing.engines import as_engine, make_engine

    probe, probe_dir = load_probe(probe_path or out / "probe")
    engine = as_engine(model) if model is not None else make_engine(config.model, config.engine, config.device,
                                                                    config.remote)
    vocab = _vocab_for(probe_dir, engine.tokenizer, config.seed)
    data = WordIndexDataset.generate(engine.tokenizer, DatasetConfig(n_prompts=n_prompts, n_words=len(probe.classes_),
                                                                     seed=config.seed), vocab=vocab)
    return probe, engine, data


def attention_stage(config: RunConfig, out: Path, heads: list[tuple[int, int]], *, model: Any = None,
                    overwrite: bool = False, probe_path: Path | None = None, n_prompts: int = 128) -> dict[str, Any]:
    """Attention-pattern evidence for the anchor hypothesis on the heads found (``attention/evidence.json``)
    and their patterns on one held-out prompt (``attention/patterns.*``)."""
    from wordpos.patching.plots import attention_patterns
    from wordpos.patching.roles import anchor_evidence, head_patterns
    from wordpos.probing.plots import save_figures

    adir = out / "attention"
    if (adir / "evidence.json").exists() and not overwrite:
        return read_json(adir / "evidence.json", "attention evidence")
    # the test split is a fifth of the prompts: generate enough for n_prompts held-out-word prompts
    _, engine, data = _stage_inputs(config, out, model, probe_path, max(n_prompts * 5, 64))
    prompts = data.test
    evidence = anchor_evidence(engine, prompts, heads, max_prompts=n_prompts)
    summary = {"heads": evidence, "n_prompts": min(n_prompts, len(prompts)), "split": "test",
               "hypothesis": "anchor_vs_space_logit = 2 (scores 3 on anchors, 1 on word starts), to_other = 0"}
    if heads:
        pats, tokens = head_patterns(engine, prompts, heads)
        summary["example_prompt"] = prompts.text(0, engine.tokenizer)
        fig = attention_patterns(pats, tokens, f"{config.model}: attention of the heads found, from the words of one "
                                               f"held-out prompt", query_from=max(int(prompts.prefix_len[0]) - 1, 0),
                                 as_dict=True)  # only written: no Figure made
        save_figures({"patterns": fig}, adir)
    write_json(adir / "evidence.json", summary)
    return summary


def check_resumed_circuit(cdir: Path, parallel_attn_mlp: bool, refused: str | None = None,
                          edges: bool = False) -> str | None:
    """Refuse to resume a circuit that an earlier wordpos computed wrongly for this model: an edge circuit on the
    sequential graph where attention and MLP run in parallel, or an edge circuit where edge patching is now refused
    (``refused``, :func:`~wordpos.probing.engines.split_inputs.split_inputs_unsupported`). Returns a note when a
    run that draws ``edges`` resumes an earlier head-level circuit (kept), else None."""
    if not (cdir / "circuit.json").exists():
        return None
    summary = read_json(cdir / "circuit.json", "circuit summary")
    if summary.get("kind") != "edge":
        return (f"{cdir} holds the head-level circuit of an earlier run (its model was not served edges then); it is "
                "kept. Remove that folder and run again for the edge circuit.") if edges else None
    fix = (f"Remove {cdir} and run the same command again: the other stages are kept and only the circuit is "
           "recomputed.")
    if refused is not None:  # (another engine's run, which cannot draw edges, still resumes a valid one)
        raise ConfigError(f"{cdir} holds an edge circuit from an earlier run, but edge patching is wrong on this model "
                          f"({refused}). {fix}")
    saved = cdir / "edge_circuit.json"
    graph = read_json(saved, "edge circuit").get("graph", {}) if saved.exists() else {}
    if bool(graph.get("parallel_attn_mlp", False)) != bool(parallel_attn_mlp):
        raise ConfigError(f"{cdir} holds an edge circuit computed on the sequential edge graph (head -> same-layer MLP "
                          "edges), but this model runs attention and MLP in parallel, so that circuit patched paths "
                          f"the model does not have (an earlier wordpos). {fix}")
    return None


def edge_circuit_run_stage(config: RunConfig, out: Path, *, model: Any = None, overwrite: bool = False,
                           probe_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The edge circuit of ``wordpos run``: edge scores (EAP-IG by default) on fresh clean/corrupted pairs over
    held-out words, the faithfulness curve against random circuits (counterfactual ablation by default), and the
    smallest circuit reaching ``circuit_target`` (``circuit/``)."""
    from wordpos.circuit.edge_circuit import edge_circuit_stage
    from wordpos.patching.activation import prepare
    from wordpos.patching.corruptions import make_pairs
    from wordpos.patching.experiment import _vocab_for
    from wordpos.probing.engines import as_engine, make_engine

    cdir = out / "circuit"
    if (cdir / "circuit.json").exists() and not overwrite:
        return read_json(cdir / "circuit.json", "circuit summary")
    probe, probe_dir = load_probe(probe_path or out / "probe")
    engine = as_engine(model) if model is not None else make_engine(config.model, config.engine, config.device,
                                                                    config.remote, dtype=config.dtype)
    vocab = _vocab_for(probe_dir, engine.tokenizer, config.seed)
    pairs = make_pairs(engine.tokenizer, config.n_pairs, vocab=vocab, words="test", n_words=len(probe.classes_),
                       seed=config.seed)
    ctx = prepare(engine, pairs, probe, full_base_cache=True)  # the edge runner reads both runs' writers
    return edge_circuit_stage(engine, ctx, cdir, scores=config.circuit_scores, ablation=config.circuit_ablation,
                              target=config.circuit_target, steps=config.circuit_steps,
                              n_random=config.circuit_n_random, progress=progress, seed=config.seed,
                              model_name=config.model)


def build_circuit_stage(config: RunConfig, out: Path, *, model: Any = None, overwrite: bool = False,
                        probe_path: Path | None = None, path_dir: Path | None = None,
                        mlp_dir: Path | None = None) -> dict[str, Any]:
    """Graph from the path-patching stage, pruned, checked for faithfulness, rendered and exported."""
    from wordpos.circuit.faithfulness import faithfulness
    from wordpos.circuit.graph import build_graph
    from wordpos.circuit.prune import prune_min_edges, prune_threshold, prune_top_k
    from wordpos.circuit.render import render_circuit, save_circuit_figure
    from wordpos.circuit.export import save_graph
    from wordpos.patching.roles import HeadRoles

    cdir = out / "circuit"
    if (cdir / "circuit.json").exists() and not overwrite:
        return read_json(cdir / "circuit.json", "circuit summary")
    path_dir = path_dir or out / "patch_path"
    mlp_dir = mlp_dir or out / "patch_activation" / "mlp"
    direct = EffectResult.load(path_dir)
    edges = EffectResult.load(path_dir / "edges") if (path_dir / "edges" / "effects.json").exists() else None
    mlp = EffectResult.load(mlp_dir) if (mlp_dir / "effects.json").exists() else None
    roles_raw = read_json(path_dir / "roles.json", "head roles")
    import numpy as np

    roles = HeadRoles(scores={k: np.asarray(v) for k, v in roles_raw["scores"].items()},
                      n_prompts=roles_raw["n_prompts"], config=roles_raw.get("config", {}))
    probe, engine, data = _stage_inputs(config, out, model, probe_path, min(config.n_prompts or config.sizing.circuit_prompts,
                                                                              config.sizing.circuit_prompts))
    act_dir = out / "patch_activation"
    total = EffectResult.load(act_dir) if (act_dir / "effects.json").exists() else None
    graph_args = dict(model=config.model, probe_layer=int(probe.layer), metric=direct.metric,
                      n_prompts=direct.n_prompts, n_heads=engine.dims.n_heads, total=total)
    G_full = build_graph(direct, edges, roles, mlp, **graph_args)
    # the circuit is a set of heads (faithfulness ablates heads, never MLPs): MLP edges, whose effects are
    # total rather than direct, stay in graph_full but do not compete for the pruning share
    G = build_graph(direct, edges, roles, None, **graph_args)
    if config.threshold is not None:
        pruned = prune_threshold(G, config.threshold)
    elif config.circuit_top_k is not None:
        pruned = prune_top_k(G, config.circuit_top_k)
    else:
        pruned = prune_min_edges(G, keep=config.keep)
    heads = sorted({(d["layer"], d["head"]) for _, d in pruned.graph.nodes(data=True) if d.get("kind") == "head"})
    faith = faithfulness(engine, probe, data, heads, method="mean")
    cdir.mkdir(parents=True, exist_ok=True)
    save_graph(G_full, cdir / "graph_full.json")
    for suffix in ("json", "graphml", "gexf", "dot"):
        save_graph(pruned.graph, cdir / f"graph.{suffix}")
    fig = render_circuit(pruned.graph)
    save_circuit_figure(fig, cdir, name="circuit")
    summary = {"nodes": pruned.graph.number_of_nodes(), "edges": pruned.graph.number_of_edges(),
               "heads": [f"{L}.{h}" for L, h in heads], "prune": pruned.describe(),
               "faithfulness": faith.to_dict()}
    write_json(cdir / "circuit.json", summary)
    return summary
