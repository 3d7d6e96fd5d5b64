"""The run report as one self-contained HTML page (no network: images inline, a few lines of JS).

    page = render_page(title, curves_png, runs)    # runs: [RunView(label, config, final, step, episodes)]

Pure: data in, a string out; `igpo_jax.report` reads the run directories and writes the file.
Sections: learning curves (one PNG, every run on it), config and final metrics side by side (keys
whose values differ between runs first), then per run the sampled episodes of one step, each a
collapsed <details>, turn by turn: what the model wrote, its queries, what came back, P(gold) on
entering the turn as a bar, and the information gain the turn earned in green (+) or red (−).
A filter by finish reason and outcome reward keeps hundreds of episodes readable.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence

# The final-metrics rows shown first (the rest are one click away): step, learning signal, health.
HEADLINE_METRICS = ("step", "reward/mean", "reward/f1", "reward/em", "ig/mean", "actor/kl_loss", "actor/grad_norm",
                    "rollout/searches_per_episode", "response_length/mean")

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
tr.differs td{background:#fff8e1}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.curves{max-width:100%}
details.episode{border:1px solid #ddd;border-radius:4px;margin:4px 0;padding:2px 8px}
details.episode>summary{cursor:pointer}
.tag{display:inline-block;padding:0 6px;border-radius:8px;background:#eee;font-size:12px}
.turn{border-left:3px solid #bbb;margin:8px 0 8px 4px;padding:2px 8px}
.pbar{display:inline-block;width:120px;height:10px;background:#eee;vertical-align:middle;border-radius:2px}
.pbar>span{display:block;height:100%;background:#1976d2;border-radius:2px}
.ig{font-weight:600;padding:0 4px;border-radius:3px}.ig.pos{color:#1b5e20;background:#e8f5e9}
.ig.neg{color:#b71c1c;background:#ffebee}.ig.none{color:#777}
pre{white-space:pre-wrap;word-break:break-word;background:#fafafa;margin:4px 0;padding:4px}
.filters{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}
"""

# Filtering runs in the page: one pass over the episodes' data attributes.
_JS = """
function igpoFilter(){
  var f=document.getElementById('f-finish').value, lo=parseFloat(document.getElementById('f-rmin').value),
      hi=parseFloat(document.getElementById('f-rmax').value), shown=0;
  document.querySelectorAll('details.episode').forEach(function(e){
    var r=parseFloat(e.dataset.reward);
    var ok=(f===''||e.dataset.finish===f)&&(isNaN(lo)||r>=lo)&&(isNaN(hi)||r<=hi);
    e.style.display=ok?'':'none'; if(ok)shown++;});
  document.getElementById('f-count').textContent=shown;
}
function igpoOpen(open){document.querySelectorAll('details.episode').forEach(function(e){
  if(e.style.display!=='none')e.open=open;});}
"""


@dataclasses.dataclass(frozen=True)
class RunView:
    label: str
    config: Mapping[str, object]  # flattened: "rollout.n" → 4
    final: Mapping[str, float]  # the last metrics record
    step: int | None  # the step whose samples are shown (None: the run wrote none)
    episodes: Sequence[Mapping]  # sample records (reporting.samples)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4g}" if isinstance(x, float) else _e(x)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} → {'a.b': 1}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def table(labels: Sequence[str], rows: Mapping[str, Sequence[object]], css_class: str) -> str:
    """Keys down, runs across; a row whose values differ between runs is marked (and comes first)."""
    differs = lambda values: len({repr(v) for v in values}) > 1
    order = sorted(rows, key=lambda k: (not differs(rows[k]), k))
    head = "<tr><th>key</th>" + "".join(f"<th>{_e(label)}</th>" for label in labels) + "</tr>"
    body = "".join(
        f'<tr class="{"differs" if differs(rows[k]) else "same"}"><td>{_e(k)}</td>'
        + "".join(f'<td class="num">{_num(v)}</td>' for v in rows[k]) + "</tr>" for k in order)
    return f'<table class="{css_class}">{head}{body}</table>'


def p_bar(p: float | None) -> str:
    width = 0.0 if p is None else max(0.0, min(1.0, p)) * 100
    return f'<span class="pbar" title="P(gold) {_num(p)}"><span style="width:{width:.1f}%"></span></span>'


def ig_span(ig: float | None) -> str:
    if ig is None:
        return '<span class="ig none">IG –</span>'
    return f'<span class="ig {"pos" if ig > 0 else "neg" if ig < 0 else "none"}">IG {ig:+.3g}</span>'


def turn_html(t: int, turn: Mapping, p_after: float | None, final: bool) -> str:
    """One turn: P(gold) in the context it was written in (a bar), then either the gain it
    earned (P after it − P before, coloured) or, for the final turn, a note that F1 scores it."""
    p = turn.get("p_gold")
    effect = ("<i>final turn: scored by F1</i>" if final
              else f"→ {_num(p_after)} {ig_span(turn.get('info_gain'))}")
    parts = [f'<div class="turn" data-turn="{t}" data-p-gold="{"" if p is None else f"{p:.6g}"}">',
             f"<b>turn {t + 1}</b> P(gold) {p_bar(p)} {_num(p)} {effect}",
             f' · advantage {_num(turn.get("advantage"))}', f'<pre class="text">{_e(turn["text"])}</pre>']
    if turn.get("queries"):
        parts.append('<div>queries: <ul class="queries">' + "".join(f"<li>{_e(q)}</li>" for q in turn["queries"])
                     + "</ul></div>")
    if turn.get("retrieved_ids"):
        parts.append(f'<div>retrieved: {_e(", ".join(turn["retrieved_ids"]))}</div>')
    if turn.get("tool_result"):
        parts.append(f'<details><summary>what came back</summary><pre class="result">{_e(turn["tool_result"])}'
                     "</pre></details>")
    parts.append("</div>")
    return "".join(parts)


def episode_html(k: int, ep: Mapping) -> str:
    reward = ep.get("f1")
    turns = ep.get("turn_records") or []
    p_gold = [t.get("p_gold") for t in turns]
    moved = f" · P(gold) {_num(p_gold[0])} → {_num(p_gold[-1])}" if p_gold and p_gold[0] is not None else ""
    summary = (f'#{k} <span class="tag">{_e(ep.get("finish_reason"))}</span> reward {_num(reward)} · '
               f'EM {_num(ep.get("em"))} · {len(turns)} turns{moved} · {_e(ep.get("question", ""))}')
    gold = " | ".join(ep.get("golden_answers") or [])
    body = (f"<div>gold: <b>{_e(gold)}</b> · answer: <b>{_e(ep.get('answer'))}</b> · "
            f"no-format F1 {_num(ep.get('no_format_f1'))} · data source {_e(ep.get('data_source'))}</div>"
            + "".join(turn_html(t, turn, p_gold[t + 1] if t + 1 < len(turns) else None, t == len(turns) - 1)
                      for t, turn in enumerate(turns)))
    return (f'<details class="episode" data-finish="{_e(ep.get("finish_reason"))}" '
            f'data-reward="{"" if reward is None else reward}"><summary>{summary}</summary>{body}</details>')


def episodes_section(run: RunView) -> str:
    if run.step is None:
        return f'<section class="episodes" data-run="{_e(run.label)}"><h3>{_e(run.label)}: no samples</h3></section>'
    n = len(run.episodes)
    reasons = Counter(str(ep.get("finish_reason")) for ep in run.episodes)
    rewards = [ep["f1"] for ep in run.episodes if isinstance(ep.get("f1"), (int, float))]
    mean = f", mean reward {sum(rewards) / len(rewards):.3g}" if rewards else ""
    return (f'<section class="episodes" data-run="{_e(run.label)}" data-step="{run.step}" data-count="{n}">'
            f"<h3>{_e(run.label)} — step {run.step}: {n} episodes "
            f"({', '.join(f'{c} {_e(r)}' for r, c in reasons.most_common())}{mean})</h3>"
            + "".join(episode_html(k, ep) for k, ep in enumerate(run.episodes)) + "</section>")


def filters(runs: Sequence[RunView]) -> str:
    reasons = sorted({str(ep.get("finish_reason")) for run in runs for ep in run.episodes})
    options = '<option value="">any</option>' + "".join(f'<option value="{_e(r)}">{_e(r)}</option>'
                                                        for r in reasons)
    total = sum(len(run.episodes) for run in runs)
    return (f'<div class="filters">finish reason <select id="f-finish" onchange="igpoFilter()">{options}</select> '
            'reward ≥ <input id="f-rmin" type="number" step="0.1" size="5" oninput="igpoFilter()"> '
            '≤ <input id="f-rmax" type="number" step="0.1" size="5" oninput="igpoFilter()"> '
            f'<span id="f-count">{total}</span> episodes shown '
            '<button onclick="igpoOpen(true)">expand</button><button onclick="igpoOpen(false)">collapse</button></div>')


def render_page(title: str, curves_png_b64: str | None, curve_keys: Sequence[str], runs: Sequence[RunView],
                curves_error: str = "") -> str:
    labels = [r.label for r in runs]
    if curves_png_b64:
        curves = (f'<figure class="curves" data-runs="{_e(",".join(labels))}" data-keys="{_e(",".join(curve_keys))}">'
                  f'<img class="curves" alt="learning curves of {_e(", ".join(labels))}" '
                  f'src="data:image/png;base64,{curves_png_b64}"></figure>')
    else:
        curves = f'<p class="curves-missing">no learning curves: {_e(curves_error)}</p>'
    config_keys = sorted({k for r in runs for k in r.config})
    metric_keys = sorted({k for r in runs for k in r.final})
    headline = [k for k in metric_keys if k in HEADLINE_METRICS or k.startswith("val/")]
    finals = (table(labels, {k: [r.final.get(k) for r in runs] for k in headline}, "final-metrics")
              + f"<details><summary>all {len(metric_keys)} metrics</summary>"
              + table(labels, {k: [r.final.get(k) for r in runs] for k in metric_keys}, "all-metrics") + "</details>")
    differing = [k for k in config_keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    configs = ((table(labels, {k: [r.config.get(k) for r in runs] for k in differing}, "config-differs")
                if differing else "<p>(one run, or the same config)</p>")
               + f"<details><summary>all {len(config_keys)} keys</summary>"
               + table(labels, {k: [r.config.get(k) for r in runs] for k in config_keys}, "config") + "</details>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_JS}</script></head><body>"
            f"<h1>{_e(title)}</h1><h2>Learning curves</h2>{curves}"
            f"<h2>Final metrics</h2>{finals}"
            f"<h2>Config</h2>{configs}"
            f"<h2>Sampled episodes</h2>{filters(runs)}" + "".join(episodes_section(r) for r in runs)
            + "</body></html>")
