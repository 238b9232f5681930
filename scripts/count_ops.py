"""The circuit stage's launches, counted on the CPU (issue 14): on a GPU the stage is bound by the host's work per
operator (the H100 profile: 3,611 kernel launches and ~28,000 aten calls for 0.16 s of device time), and that work
does not depend on the device, so counting operators here says what a change does there before a GPU times it.

The stage (``circuit.edge_circuit.edge_circuit_stage``, as ``wordpos run`` calls it) runs under a
``TorchDispatchMode`` that counts every aten operator it dispatches, per phase (scores, prefetch, select, curve, and
``other``: the runner's set-up, figures and exports), on a NARROW model with SmolLM2-135M's architecture (30 layers,
9 heads, 3 key/value heads, RMSNorm, RoPE; width 36 instead of 576: operator counts depend on the layer and head
structure, not the width) and with the accelerator's chunking (``Sizing.accelerator_tokens``, the writer-buffer cap
of the real width), so batches are split where a GPU would split them.

Counted: ``ops`` (every aten call, views included), ``kernels`` (calls that would launch device work: views,
allocations and metadata excluded), ``syncs`` (calls that make the host wait for the device: ``.item()``/``float()``,
``nonzero``, ``torch.equal``, ``bool(tensor)``, ...; device-to-host copies such as ``.cpu()``/``.tolist()`` are not
dispatched on the CPU and are not counted), and the forwards (``forwards``: lean patched forwards and gradient
passes, each a run of the model's blocks). Counts are exact and repeatable; they are not times.

    python scripts/count_ops.py                       # probe layer 8, 16 pairs (the benchmark's circuit stage)
    python scripts/count_ops.py --layer 23 --top 30 --out ops.json
    python scripts/count_ops.py --run --out ops-run.json     # every stage of ``wordpos run``, the GPU's paths

``--run`` counts every stage of ``wordpos run`` (the pipeline as the benchmark runs it, sized as on the GPU) with
the code paths an accelerator takes forced on the CPU (:func:`accelerator_paths`: residuals kept as tensors and all
layers fitted in one group, the batched preconditioned L-BFGS for every probe fit and refit, the hook-free route
for head edits, interventions starting at different layers coalesced into one forward, the accelerator's batch
sizes). The solver's operators are counted apart (``solver``) with its
iterations: on CUDA an iteration is one replay of a recorded graph, not its operators one by one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_smollm2_arch  # noqa: E402
from profile_circuit import probe_context  # noqa: E402

#: aten calls that make the host wait for the device (their result's size or value is read on the host); indexing
#: with a boolean mask (``index``/``index_put_``) is counted with them (:func:`_syncs`)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "item", "allclose", "bincount", "repeat_interleave"}
#: aten calls that launch no kernel: allocations, metadata and views (views are also told by their schema)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias", "view", "_unsafe_view",
             "as_strided", "set_", "resize_", "_to_copy_noop", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_reshape_alias", "clone_noop"}
PHASES = ("scores", "prefetch", "select", "curve", "other")


def _syncs(name: str, args: Any, kwargs: Any) -> bool:
    """Whether the call makes a CUDA host wait: a :data:`SYNC_OPS` member (``repeat_interleave`` only without
    ``output_size``), or indexing by a boolean mask (CUDA finds the mask's ``nonzero`` first)."""
    if name == "repeat_interleave":
        return (kwargs or {}).get("output_size") is None
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
    return False


class OpCounter(TorchDispatchMode):
    """Counts aten calls by phase (``self.phase``) and by where they would run on a GPU: ``device`` inside the edge
    runner's calls and the edge scoring (``self.depth`` > 0: the model's blocks, the corrections, the probe's
    readout), ``host`` elsewhere (masks, pruning, bootstraps, exports: CPU tensors on any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase, self.depth = "other", 0
        self.by_op: Counter[str] = Counter()
        self.by_phase: dict[str, Counter[str]] = {p: Counter() for p in PHASES}

    def _where(self) -> tuple[Counter[str], str, bool]:
        """(the counter a call goes to, its keys' prefix, whether its kernels are also counted by name)."""
        return self.by_phase[self.phase], "device_" if self.depth else "host_", bool(self.depth)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name.split("::")[-1]
        c, key, named = self._where()
        c[f"{key}ops"] += 1
        if _syncs(name, args, kwargs):
            c[f"{key}syncs"] += 1
        elif not (func.is_view or name in NO_KERNEL):
            c[f"{key}kernels"] += 1
            if named:
                self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    def summary(self, top: int) -> dict[str, Any]:
        total: Counter[str] = Counter()
        for c in self.by_phase.values():
            total.update(c)
        return {"total": dict(total), "by_phase": {p: dict(c) for p, c in self.by_phase.items()},
                "top_device_kernels": dict(self.by_op.most_common(top))}


@contextlib.contextmanager
def accelerator_chunking(real_width: int = 576) -> Iterator[None]:
    """Batches split as on an accelerator: the CPU's token budget and prompts per batch are the accelerator's, and
    the edge runner's writer-buffer cap is computed for the real model's width (8 GiB, as on a GPU)."""
    from unittest import mock

    from wordpos.patching import eap, edge_runner
    from wordpos.patching.sizing import Sizing

    def tokens_per_forward(engine: Any, n_writers: int, *, max_tokens: int | None = None, grad: bool = False) -> int:
        n = min(max_tokens or Sizing().accelerator_tokens, (8 << 30) // max(1, 4 * n_writers * real_width))
        return max(1, n // 4 if grad and max_tokens is None else n)

    with mock.patch.object(Sizing, "tokens_per_forward", lambda self, device: self.accelerator_tokens), \
            mock.patch.object(Sizing, "prompts_per_batch", lambda self, device: self.accelerator_prompts), \
            mock.patch.object(edge_runner, "tokens_per_forward", tokens_per_forward), \
            mock.patch.object(eap, "tokens_per_forward", tokens_per_forward):  # (imported there by name)
        yield


@contextlib.contextmanager
def accelerator_paths() -> Iterator[None]:
    """The code an accelerator runs, on the CPU: free device memory reported (residuals kept as tensors, every layer
    fitted in one group), the batched preconditioned L-BFGS for every probe fit and refit (``auto_optimizer``: the
    refits of all sets in one fit), the hook-free route for head edits, interventions that start at different
    layers coalesced into one forward (``runner._launch_bound``), and :func:`accelerator_chunking`'s batch sizes."""
    from unittest import mock

    import wordpos.probing.engines.memory as memory
    import wordpos.probing.probe as probe
    from wordpos.patching import lean_route, runner

    with accelerator_chunking(), lean_route.forced(True), \
            mock.patch.object(runner, "_launch_bound", lambda device: True), \
            mock.patch.object(memory, "free_memory_bytes", lambda device: 8 << 30), \
            mock.patch.object(probe, "auto_optimizer", lambda device: "batched"):
        yield


class StageCounter(OpCounter):
    """Counts aten calls per stage of ``wordpos run`` (``self.phase`` is the stage's name), the probe solver's apart
    (``solver``, with its iterations: on CUDA each is one replay of a recorded graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_phase = {}
        self.solver_calls: Counter[str] = Counter()
        self.iterations: Counter[str] = Counter()
        self.in_solver = False

    def _where(self) -> tuple[Counter[str], str, bool]:
        return self.by_phase.setdefault(self.phase, Counter()), "solver_" if self.in_solver else "", not self.in_solver

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Tag the pipeline's stages (``pipeline._stage``, as ``bench.py`` wraps them) and the solver's calls."""
        from unittest import mock

        import wordpos.probing.probe as probe
        from bench import _wrap_stages

        solver = probe.batched_lbfgs_logreg

        @contextlib.contextmanager
        def stage(name: str, inner: Any) -> Iterator[None]:
            with inner:
                before, self.phase = self.phase, name
                try:
                    yield
                finally:
                    self.phase = before

        def counted_solver(*a: Any, **k: Any) -> Any:
            self.in_solver = True
            try:
                out = solver(*a, **k)
            finally:
                self.in_solver = False
            self.iterations[self.phase] += int(out[2])
            self.solver_calls[self.phase] += 1
            return out

        undo = _wrap_stages(stage)
        try:
            with mock.patch.object(probe, "batched_lbfgs_logreg", counted_solver):
                yield
        finally:
            undo()


def count_run(width: int = 36, layer: int | None = 8, n_prompts: int | None = None, n_pairs: int | None = None,
              n_random: int = 10, top: int = 15) -> dict[str, Any]:
    """Operators per stage of ``wordpos run`` on the narrow SmolLM2-architecture model with the accelerator's paths
    (:func:`accelerator_paths`), as :func:`bench._bench` sizes the run (``layer``: the patched layer)."""
    from wordpos.circuit.pipeline import RunConfig, run_pipeline
    from wordpos.probing import load_model

    work = Path(tempfile.mkdtemp(prefix="wordpos-ops-"))
    try:
        path = build_smollm2_arch(work / "narrow", width=width)
        model = load_model(str(path), device="cpu", dtype="float32")
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        config = RunConfig(model=str(path), n_prompts=n_prompts, n_pairs=n_pairs, n_random=n_random, layer=layer,
                           device="cpu").sized(n_layers, n_heads)
        counter = StageCounter()
        with accelerator_paths(), counter.watching(), counter:
            summary = run_pipeline(config, work / "run", model=model, overwrite=True, progress=False).summary
        stages = {k: dict(v) for k, v in counter.by_phase.items() if k != "other" or sum(v.values())}
        return {"model": f"SmolLM2-135M's architecture, width {width} (random weights)", "width": width,
                "patched_layer": summary["patched_layer"], "n_prompts": config.n_prompts, "n_pairs": config.n_pairs,
                "n_random": config.n_random, "torch": torch.__version__, "paths": "accelerator (forced on the CPU)",
                "stages": stages, "solver_iterations": dict(counter.iterations),
                "solver_calls": dict(counter.solver_calls),
                "top_kernels_outside_the_solver": dict(counter.by_op.most_common(top))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_run(rec: dict[str, Any]) -> None:
    print(f"wordpos run, {rec['model']}, patched layer {rec['patched_layer']}, {rec['n_prompts']} prompts, "
          f"{rec['n_pairs']} pairs, {rec['n_random']} random sets; the accelerator's paths")
    print(f"  {'stage':22s} {'ops':>8s} {'kernels':>8s} {'syncs':>6s} | solver: {'ops':>7s} {'kernels':>8s} "
          f"{'syncs':>6s} {'iterations':>10s} {'calls':>5s}")
    for stage, c in rec["stages"].items():
        print(f"  {stage:22s} {c.get('ops', 0):8,} {c.get('kernels', 0):8,} {c.get('syncs', 0):6,} |         "
              f"{c.get('solver_ops', 0):7,} {c.get('solver_kernels', 0):8,} {c.get('solver_syncs', 0):6,} "
              f"{rec['solver_iterations'].get(stage, 0):10,} {rec['solver_calls'].get(stage, 0):5}")
    print("  top kernels (solver apart):", ", ".join(f"{k} {v}" for k, v in rec["top_kernels_outside_the_solver"].items()))


@contextlib.contextmanager
def phases(counter: OpCounter) -> Iterator[None]:
    """Tag the stage's calls with their phase (the functions the stage looks up when it runs)."""
    from unittest import mock

    from wordpos.circuit import edge_circuit, evaluation
    from wordpos.patching import eap

    def tagged(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            before, counter.phase = counter.phase, phase
            try:
                return fn(*a, **k)
            finally:
                counter.phase = before
        return call

    with mock.patch.object(eap, "score_edges", tagged("scores", eap.score_edges)), \
            mock.patch.object(evaluation.MemoEvaluate, "prefetch",
                              tagged("prefetch", evaluation.MemoEvaluate.prefetch)), \
            mock.patch.object(edge_circuit, "select_circuit", tagged("select", edge_circuit.select_circuit)), \
            mock.patch.object(evaluation, "faithfulness_curve", tagged("curve", evaluation.faithfulness_curve)), \
            mock.patch.object(evaluation, "node_curve", tagged("curve", evaluation.node_curve)):
        yield


@contextlib.contextmanager
def device_regions(counter: OpCounter, forwards: Counter[str]) -> Iterator[None]:
    """Mark the calls whose operators would run on the GPU (the edge runner's set-up, evaluations and clean values,
    and the edge scoring) and count the lean forwards (patched and gradient passes through the model's blocks)."""
    from unittest import mock

    from wordpos.patching import eap
    from wordpos.patching.edge_runner import EdgeRunner
    from wordpos.probing.engines.lean import LeanBlocks

    def region(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            counter.depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.depth -= 1
        return call

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            forwards[counter.phase] += 1
            return fn(*a, **k)
        return call

    with contextlib.ExitStack() as stack:
        for name in ("__init__", "evaluate_keep_not", "clean_values"):
            stack.enter_context(mock.patch.object(EdgeRunner, name, region(getattr(EdgeRunner, name))))
        stack.enter_context(mock.patch.object(eap, "score_edges", region(eap.score_edges)))
        stack.enter_context(mock.patch.object(LeanBlocks, "forward", counted(LeanBlocks.forward)))
        yield


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=8, help="the probe's layer (the circuit's graph ends there)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--width", type=int, default=36, help="the narrow model's width (a multiple of 9)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed by name")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--run", action="store_true", help="count every stage of `wordpos run` (--layer: the patched "
                    "layer), the accelerator's paths forced")
    ap.add_argument("--prompts", type=int, default=None, help="--run: the probe's prompts (default: the run's sizing)")
    ap.add_argument("--random", type=int, default=10, help="--run: random-head control sets")
    args = ap.parse_args(argv)
    if args.run:
        rec = count_run(args.width, args.layer, args.prompts, args.pairs, args.random, args.top)
        print_run(rec)
        if args.out:
            args.out.write_text(json.dumps(rec, indent=1) + "\n")
        return rec

    from wordpos.circuit.edge_circuit import edge_circuit_stage, load_stage_modules
    from wordpos.probing import load_model

    work = Path(tempfile.mkdtemp(prefix="wordpos-ops-"))
    try:
        model = load_model(str(build_smollm2_arch(work / "narrow", width=args.width)), device="cpu", dtype="float32")
        L = args.layer
        with accelerator_chunking():
            engine, ctx = probe_context(model, L, args.pairs)
            load_stage_modules()
            edge_circuit_stage(engine, ctx, work / "warm", progress=False, png=False)  # first-use paths out of the way
            counter, forwards = OpCounter(), Counter()
            with device_regions(counter, forwards), phases(counter), counter:
                s = edge_circuit_stage(engine, ctx, work / "counted", progress=False, png=False)
        rec = {"model": f"SmolLM2-135M's architecture, width {engine.dims.d_model} (random weights)",
               "probe_layer": L, "n_pairs": args.pairs, "n_valid_edges": s["n_valid_edges"], "edges": s["edges"],
               "torch": torch.__version__, "chunking": "accelerator", **counter.summary(args.top),
               "forwards": dict(forwards)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t, ph = rec["total"], rec["by_phase"]
    print(f"circuit stage, probe layer {L}, {args.pairs} pairs, {rec['n_valid_edges']} edges, {rec['forwards']} "
          "forwards (device: the runner's calls and the scoring; host: the rest)")
    for p in (*PHASES, "total"):
        c = t if p == "total" else ph[p]
        print(f"  {p:9s} device {c.get('device_ops', 0):6,} ops {c.get('device_kernels', 0):6,} kernels "
              f"{c.get('device_syncs', 0):3} syncs | host {c.get('host_ops', 0):6,} ops {c.get('host_kernels', 0):6,} "
              f"kernels {c.get('host_syncs', 0):3} syncs")
    print("  top device kernels:", ", ".join(f"{k} {v}" for k, v in rec["top_device_kernels"].items()))
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


if __name__ == "__main__":
    main()
