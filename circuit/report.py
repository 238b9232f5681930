"""``report.html``: one self-contained page (plotly.js embedded once, works offline) with the key plot,
the layer curve, the patching heatmaps, the circuit diagram and tables of the top heads and controls."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.io as pio

from probing.io import write_text

FIGURES = [
    ("probe/key_plot", "The key plot: what the probe predicts, by true word index (rows) and absolute position"),
    ("probe/layer_curve", "Probe accuracy by layer against the position-only baseline"),
    ("probe/confusion", "Confusion matrix at the best layer"),
    ("patch_activation/heads", "Activation patching of each head (denoising)"),
    ("patch_activation/resid", "Residual-stream patching by layer and position"),
    ("patch_attribution/heads", "Attribution patching (gradient approximation)"),
    ("patch_path/heads", "Path patching: each head's direct effect on the probe"),
    ("patch_ablation/heads", "Probe accuracy drop when each head is ablated"),
    ("circuit/circuit", "The circuit: heads → probe, pruned"),
    ("attention/patterns", "Attention patterns of the heads found, on one held-out prompt"),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the figures and summaries saved by the run's stages."""
    out = Path(out)
    parts = []
    first = True
    for stem, caption in FIGURES:
        path = out / f"{stem}.plotly.json"
        if not path.exists():
            continue
        fig = pio.read_json(path)
        div = pio.to_html(fig, include_plotlyjs=True if first else False, full_html=False,
                          config={"displaylogo": False, "toImageButtonOptions": {"format": "svg"}})
        first = False
        parts.append(f"<figure>{div}<figcaption>{html.escape(caption)}</figcaption></figure>")
    p = summary["probe"]
    probe_rows = [{"quantity": k, "value": p[k]} for k in ("layer", "accuracy", "baseline_abs_pos_accuracy",
                                                            "gain_over_baseline", "shuffled_label_accuracy",
                                                            "n_train", "n_test")]
    heads = []
    for h in summary["top_heads"].get("activation", []):
        r = dict(h.get("roles", {}))
        heads.append({"head": h["head"], "activation effect": h["effect"], "role": h.get("role", ""), **r})
    role_cols = ["head", "activation effect", "role", "to_anchor", "to_space", "to_prev", "to_bos", "counter_score"]
    ab = summary.get("ablation") or {}
    ab_rows = [{"quantity": k, "value": ab.get(k)} for k in (
        "heads", "method", "clean_accuracy", "accuracy", "refit_accuracy", "baseline_abs_pos_accuracy", "random_mean",
        "random_refit_mean", "random_refit_std")]
    circ = summary.get("circuit") or {}
    faith = circ.get("faithfulness", {})
    circ_rows = [{"quantity": "heads in circuit", "value": ", ".join(circ.get("heads", []))},
                 {"quantity": "nodes / edges", "value": f"{circ.get('nodes')} / {circ.get('edges')}"}]
    circ_rows += [{"quantity": k, "value": v} for k, v in faith.items() if not isinstance(v, (list, dict))]
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
<p>Roles: share of attention from word tokens to anchors (".", ",", "\\n"), to word-initial tokens, to the previous
token and to BOS; <em>counter_score</em> = 1 &minus; total-variation distance to the "count from the anchor"
pattern (3 on the anchor, 1 on each word start).</p>
<h2>Ablating the top heads</h2>{_table(ab_rows, ["quantity", "value"])}
<h2>Circuit</h2>{_table(circ_rows, ["quantity", "value"])}
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
