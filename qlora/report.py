"""The run report: ``OUT/report.html`` (one self-contained file: styles inline, charts as base64 PNGs drawn
with matplotlib when it is installed, nothing fetched) and ``OUT/report.md``, from what a run leaves in its
folder (config.yaml, metrics.jsonl, data_stats.json, answers.json): the settings, data statistics, loss /
learning-rate / gradient-norm / speed and memory curves, the evaluations, before/after answers and the fit
warnings. ``qlora train`` writes it at the end (rank 0); ``qlora report OUT`` rebuilds it for an older or
interrupted run."""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

from .errors import QLoraError

EVAL_KEYS = ("eval_loss", "exact_match", "contains")
NO_CHARTS = "Charts need matplotlib (pip install matplotlib); the numbers are below."


def load(out: Path) -> dict:
    """What the report shows, read from the run folder ``out``."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise QLoraError(f"{out}: no metrics.jsonl (not a `qlora train` output folder, or the run wrote no step)")
    rows = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(metrics.read_text().splitlines()):  # only a last line cut by a killed run is skipped
                raise QLoraError(f"{metrics}: line {n} is not JSON") from None
    config = {}
    if (out / "config.yaml").is_file():
        import yaml
        config = yaml.safe_load((out / "config.yaml").read_text()) or {}
    read = (lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None)  # noqa: E731
    warnings = {}
    for r in rows:
        if "warning" in r:
            warnings.setdefault(r.get("kind", r["warning"]), r)
    return {"out": out, "config": config, "steps": [r for r in rows if "loss" in r],
            "evals": [r for r in rows if "eval_loss" in r], "warnings": list(warnings.values()),
            "data": read("data_stats.json"), "answers": (read("answers.json") or {}).get("items", [])}


def summary(rep: dict) -> dict:
    """The headline numbers (each one read straight from a metrics row)."""
    steps = rep["steps"]
    last = steps[-1] if steps else {}
    mem = [r["mem_gib"] for r in steps if "mem_gib" in r]
    return {"steps": last.get("step"), "final_loss": last.get("loss"), "tokens": last.get("tokens"),
            "tok_s": last.get("tok_s"), "peak_mem_gib": max(mem) if mem else None,
            "best_eval_loss": min((r["eval_loss"] for r in rep["evals"]), default=None)}


# ------------------------------------------------------------------------------------------ charts
def charts(rep: dict) -> dict[str, str] | None:
    """{title: base64 PNG} (one figure of small panels: one PNG encode per report), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, evals = rep["steps"], rep["evals"]
    series = {"loss": [("train", steps, "loss", "-"), ("validation", evals, "eval_loss", "o-")],
              "learning rate": [("lr", steps, "lr", "-")], "gradient norm": [("grad norm", steps, "grad_norm", "-")],
              "tokens/s": [("tokens/s", steps, "tok_s", "-")], "peak GPU memory (GiB)": [("GiB", steps, "mem_gib", "-")]}
    panels = {}
    for title, lines in series.items():
        lines = [(label, [(r["step"], r[k]) for r in rs if k in r], style) for label, rs, k, style in lines]
        if any(pts for _, pts, _ in lines):
            panels[title] = [x for x in lines if x[1]]
    lengths = (rep["data"] or {}).get("lengths") or []
    if not panels and not lengths:
        return {}
    n = len(panels) + bool(lengths)
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(10, 2.8 * ((n + 1) // 2)), squeeze=False)
    axes = list(axes.flat)
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, pts, style in lines:
            ax.plot(*zip(*pts), style, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    if lengths:
        ax = axes[len(panels)]
        ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))))
        ax.set_title(f"example lengths (tokens; {len(lengths)} training examples)")
    for ax in axes[n:]:
        ax.axis("off")
    return {"training curves and example lengths": _png(fig, plt)}


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------------------- writing
def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def tables(rep: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of each table, shared by the HTML and Markdown forms."""
    s, d = summary(rep), rep["data"] or {}
    out = [("Run", ["", "value"], [[k, s[k]] for k in s])]
    if d:
        keys = ("format", "records", "examples", "validation", "truncated", "dropped", "longest", "tokens",
                "trained_tokens", "template")
        out.append(("Data", ["", "value"], [[k, d.get(k)] for k in keys if k in d]))
    if rep["evals"]:
        out.append(("Evaluations", ["step", "epoch", *EVAL_KEYS],
                    [[r["step"], r.get("epoch"), *(r.get(k) for k in EVAL_KEYS)] for r in rep["evals"]]))
    if rep["answers"]:
        out.append(("Answers before and after training", ["question", "before", "after", "expected"],
                    [[a["question"], a.get("before"), a.get("after"), a["expected"]] for a in rep["answers"]]))
    if rep["config"]:
        out.append(("Settings", ["option", "value"], [[k, v] for k, v in rep["config"].items()]))
    return out


def markdown(rep: dict) -> str:
    cell = (lambda v: _fmt(v).replace("|", "\\|").replace("\n", " "))  # noqa: E731
    lines = [f"# Training report: {rep['out']}", ""]
    lines += ["## Warnings", ""] + ([f"- step {w.get('step')}: {w['warning']}" for w in rep["warnings"]]
                                     or ["none"]) + [""]
    for title, head, rows in tables(rep):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]
    lines.append("Charts: report.html.")
    return "\n".join(lines) + "\n"


def page(rep: dict, pngs: dict | None) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qlora report: {e(str(rep['out']))}</title>"
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top}.warn{color:#a40}img{max-width:100%}</style></head><body>",
             f"<h1>Training report</h1><p>{e(str(rep['out']))}</p><h2>Warnings</h2>"]
    parts.append("<ul>" + "".join(f"<li class='warn'>step {e(_fmt(w.get('step')))}: {e(w['warning'])}</li>"
                                  for w in rep["warnings"]) + "</ul>" if rep["warnings"] else "<p>none</p>")
    parts.append("<h2>Charts</h2>")
    if pngs is None:
        parts.append(f"<p>{e(NO_CHARTS)}</p>")
    for title, b64 in (pngs or {}).items():
        parts.append(f"<img alt='{e(title)}' src='data:image/png;base64,{b64}'>")
    for title, head, rows in tables(rep):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</table>")
    return "\n".join(parts) + "</body></html>\n"


def write_report(out: Path) -> tuple[Path, Path]:
    """OUT/report.html and OUT/report.md, each written atomically."""
    out = Path(out)
    rep = load(out)
    paths = []
    for name, text in (("report.html", page(rep, charts(rep))), ("report.md", markdown(rep))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def add_cli(sub) -> None:
    p = sub.add_parser("report", help="write OUT/report.html and report.md for a training run folder",
                       description="Rebuild the report of a `qlora train` output folder (an older or interrupted "
                                   "run) from its metrics.jsonl, config.yaml, data_stats.json and answers.json.")
    p.add_argument("output", metavar="OUT", help="the run's output folder (--output of qlora train)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    html_path, md_path = write_report(Path(args.output))
    print(f"report: {html_path} ({md_path})")
    return 0
