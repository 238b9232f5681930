"""``report.html``: one self-contained page (plotly.js embedded once, works offline) with the key plot,
the layer curve, the patching heatmaps, the circuit diagram and tables of the top heads and controls."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.io as pio

from wordpos.probing.io import write_text

REPORT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "svg"}}
FIGURES = [
    ("probe/key_plot", "The key plot: what the probe predicts, by true word index (rows) and absolute position"),
    ("probe/layer_curve", "Probe accuracy by layer against the position-only baseline"),
    ("probe/confusion", "Confusion matrix at the best layer"),
    ("patch_activation/heads", "Activation patching of each head (denoising)"),
    ("patch_activation/resid", "Residual-stream patching by layer and position"),
    ("patch_attribution/heads", "Attribution patching (gradient approximation)"),
    ("patch_path/heads", "Path patching: each head's direct effect on the probe"),
    ("patch_ablation/heads", "Change in probe accuracy when each head is ablated (blank = not measured)"),
    ("circuit/curve", "Faithfulness of the top-n edge circuits against random circuits of the same size (areas on a "
                      "linear axis: CPR, CMD)"),
    ("circuit/circuit", "The circuit: edges between embeddings, heads, MLPs and the probe (q/k/v inputs marked)"),
    ("attention/patterns", "Attention patterns of the heads found, on one held-out prompt"),
]


def _is_head(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v)


def _fmt(v: Any) -> str:
    """A table cell: floats to 3 decimals, heads as ``L.H`` and head lists as ``1.0, 1.3``."""
    if isinstance(v, float):
        return f"{v:.3f}"
    if _is_head(v):
        return f"{v[0]}.{v[1]}"
    if isinstance(v, (list, tuple)) and v and all(_is_head(x) for x in v):
        return html.escape(", ".join(f"{L}.{h}" for L, h in v))
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        return html.escape(", ".join(v))
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(v: Any, ci: Any) -> str:
    if v is None:
        return ""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return _fmt(v)


def _circuit_rows(circ: dict[str, Any]) -> list[dict[str, Any]]:
    """The circuit table: for the edge circuit its size, faithfulness with its interval, CPR/CMD against random
    circuits and its heads and MLPs; for the former head-level circuit its heads and faithfulness."""
    faith = circ.get("faithfulness", {})
    if "cpr" not in circ:
        rows = [{"quantity": "heads in circuit", "value": ", ".join(circ.get("heads", []))},
                {"quantity": "nodes / edges", "value": f"{circ.get('nodes')} / {circ.get('edges')}"}]
        return rows + [{"quantity": k, "value": v} for k, v in faith.items() if not isinstance(v, (list, dict))]
    inputs = circ.get("head_inputs", {})
    heads = ", ".join(f"{h}<{''.join(inputs.get(h, []))}>" if inputs.get(h) else h for h in circ.get("heads", []))
    rows = [
        {"quantity": "edge scores / ablation outside the circuit", "value": f"{circ.get('scores')} / {circ.get('ablation')}"},
        {"quantity": "circuit size (edges)", "value": f"{circ.get('edges')} of {circ.get('n_valid_edges')} "
                                                      f"({circ.get('percent_of_graph', 0):.2f}%)"},
        {"quantity": f"faithfulness (target {circ.get('target')}; "
                     f"{'reached' if circ.get('reached') else 'NOT reached'})",
         "value": _ci(faith.get("share"), faith.get("ci"))},
        {"quantity": "CPR (area under f; 1 is best)", "value": _ci(circ.get("cpr"), circ.get("cpr_ci"))},
        {"quantity": "CPR of random circuits", "value": _ci(circ.get("random_cpr"), circ.get("random_cpr_ci"))},
        {"quantity": "CMD (area of |1 - f|; 0 is best)", "value": _ci(circ.get("cmd"), circ.get("cmd_ci"))},
        {"quantity": "CMD of random circuits", "value": _ci(circ.get("random_cmd"), circ.get("random_cmd_ci"))},
        {"quantity": "heads (inputs used)", "value": heads or "-"},
        {"quantity": "MLPs", "value": ", ".join(str(m) for m in circ.get("mlps", [])) or "-"},
        {"quantity": "prompt pairs", "value": circ.get("n_pairs")},
    ]
    node = circ.get("node_curve") or {}
    if node.get("cpr") is not None:
        rows.append({"quantity": "node-level baseline CPR (top heads/MLPs)", "value": _ci(node.get("cpr"),
                                                                                        node.get("cpr_ci"))})
    return rows


def _curve_table(circ: dict[str, Any]) -> str:
    """The faithfulness curve as numbers: each size with its bootstrap interval beside random circuits."""
    points = (circ.get("curve") or {}).get("points") or []
    if not points:
        return ""
    rows = [{"fraction of edges": p["fraction"], "edges": p["edges"], "faithfulness [95% CI]": _ci(p["faithfulness"], p["ci"]),
             "random (mean ± std)": f"{p['random_mean']:.3f} ± {p['random_std']:.3f}"
             if isinstance(p.get("random_mean"), float) and p["random_mean"] == p["random_mean"] else ""}
            for p in points]
    return ("<h3>Faithfulness curve</h3>" + _table(rows, ["fraction of edges", "edges", "faithfulness [95% CI]",
                                                          "random (mean ± std)"]))


def write_report(out: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the figures and summaries saved by the run's stages."""
    out = Path(out)
    parts = []
    first = True
    for stem, caption in FIGURES:
        path = out / f"{stem}.plotly.json"
        if not path.exists():
            continue
        # the saved figure as its dict: it was validated when it was built, so it is not rebuilt as a Figure here
        fig = json.loads(path.read_text(encoding="utf-8"))
        div = pio.to_html(fig, include_plotlyjs=True if first else False, full_html=False, validate=False,
                          config=REPORT_CONFIG)
        first = False
        parts.append(f"<figure>{div}<figcaption>{html.escape(caption)}</figcaption></figure>")
    p = summary["probe"]
    probe_rows = [{"quantity": k, "value": p[k]} for k in ("layer", "accuracy", "baseline_abs_pos_accuracy",
                                                            "gain_over_baseline", "shuffled_label_accuracy",
                                                            "n_train", "n_test")]
    screen = summary.get("activation_screen") or {}
    screen_html = ""
    if screen:
        how = ("every head was patched exactly" if screen.get("measured") == "all" and not screen.get("fallback") else
               "attribution's ranking was too weak, so every head was patched exactly" if screen.get("fallback") else
               f"{screen.get('measured')} of {screen.get('n_heads')} heads patched exactly "
               f"({len(screen.get('candidates', []))} attribution-ranked candidates + {len(screen.get('audit', []))} "
               "random audit heads; the rest are blank)")
        screen_html = (f"<p>Attribution first: Spearman rank correlation of attribution with exact patching "
                       f"{_fmt(screen.get('rank_correlation'))} over the heads measured "
                       f"({_fmt(screen.get('audit_rank_correlation'))} on the random audit alone; threshold "
                       f"{_fmt(screen.get('min_rho'))}): {html.escape(how)}.</p>")
    heads = []
    for h in summary["top_heads"].get("activation", []):
        r = dict(h.get("roles", {}))
        heads.append({"head": h["head"], "activation effect": h["effect"], "role": h.get("role", ""), **r})
    role_cols = ["head", "activation effect", "role", "to_anchor", "to_space", "to_prev", "to_bos", "counter_score"]
    ab = summary.get("ablation") or {}
    ab_rows = [{"quantity": k, "value": ab.get(k)} for k in (
        "heads", "method", "clean_accuracy", "accuracy", "refit_accuracy", "baseline_abs_pos_accuracy", "random_mean",
        "random_refit_mean", "random_refit_std", "random_distinct_sets")]
    circ = summary.get("circuit") or {}
    circ_rows = _circuit_rows(circ)
    att = (summary.get("attention") or {}).get("heads", {})
    att_cols = ["head", "to_period", "to_comma", "to_newline", "to_space", "to_bos", "to_other",
                "anchor_vs_space_logit", "counter_score"]
    att_rows = [{"head": h, **v} for h, v in att.items()]
    computed = summary.get("compute_s", {})
    timing_rows = [{"stage": k, "seconds to compute": computed.get(k, v), "seconds this invocation": v}
                   for k, v in summary.get("timings_s", {}).items()]
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wordpos report: {html.escape(summary['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} figure {{ margin: 2em 0; }} figcaption {{ color: #555; font-style: italic; }}
</style></head><body>
<h1>Emergent positional embeddings of words: {html.escape(summary['model'])}</h1>
<p>A logistic-regression probe reads each word's index (0&ndash;6) from the residual stream at the word's last token,
scored on held-out words against the best classifier that only knows the absolute token position. Patching,
attribution, path patching and ablation then locate the heads that write this information.</p>
<h2>Probe</h2>{_table(probe_rows, ["quantity", "value"])}
<h2>Top heads (activation patching) and their attention roles</h2>{_table(heads, role_cols)}
{screen_html}
<p>Roles: share of attention from word tokens to anchors (".", ",", "\\n"), to word-initial tokens, to the previous
token and to BOS; <em>counter_score</em> = 1 &minus; total-variation distance to the "count from the anchor"
pattern (3 on the anchor, 1 on each word start).</p>
<h2>Ablating the top heads</h2>{_table(ab_rows, ["quantity", "value"])}
<h2>Circuit</h2>{_table(circ_rows, ["quantity", "value"])}
{_curve_table(circ)}
<h2>Attention evidence for the anchor hypothesis</h2>{_table(att_rows, att_cols)}
<p>Attention mass from word tokens (held-out words) to each anchor kind, to word-initial tokens, to BOS and elsewhere;
<em>anchor_vs_space_logit</em> is the mean log ratio of the weight per anchor token to the weight per word-initial
token, which equals their score difference: the hypothesis (3 on anchors, 1 on word starts) predicts 2.0 and
<em>to_other</em> near 0.</p>
{''.join(parts)}
<h2>Timings</h2>{_table(timing_rows, ["stage", "seconds to compute", "seconds this invocation"])}
<p>A re-run reads finished stages back from disk: "seconds to compute" keeps what each stage cost when it ran.</p>
</body></html>
"""
    return write_text(out / "report.html", doc)
