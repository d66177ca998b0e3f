"""Run reports: loss-curve and score-distribution plots (PNG) and a Markdown summary.

Reads the ``metrics.jsonl`` files the training loop writes; plotting uses matplotlib's
non-interactive Agg backend, so it works on headless nodes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from aligner.data.datasets import iter_json_objects
from aligner.evaluation.overoptimization import Fit


def read_metrics(path) -> List[dict]:
    """The rows of a ``metrics.jsonl`` (errors name file and line)."""
    return [row for _, row in iter_json_objects(path)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Mapping[str, str], out_png, key: str = "loss") -> Path:
    """One panel per run: train ``key`` per step, and validation ``key`` where logged."""
    plt = _pyplot()
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, path) in zip(axes[0], runs.items()):
        rows = read_metrics(path)
        for split, style in (("train", "-"), ("val", "o--")):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_distributions(values: Mapping[str, Sequence[float]], out_png, xlabel: str, bins: Optional[Sequence[float]] = None) -> Path:
    """Overlaid histograms (one per label) of e.g. ground-truth scores before / after alignment."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, vals in values.items():
        mean = sum(vals) / max(1, len(vals))
        ax.hist(list(vals), bins=bins if bins is not None else 20, alpha=0.55, label=f"{label} (mean {mean:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path, title: str, sections: Sequence[tuple]) -> Path:
    """``sections``: (heading, markdown body) pairs."""
    text = [f"# {title}", ""]
    for heading, body in sections:
        text += [f"## {heading}", "", body.rstrip(), ""]
    path = Path(path)
    path.write_text("\n".join(text), encoding="utf-8")
    return path


def load_json(path) -> Dict:
    return json.loads(Path(path).read_text())


def monitor_curve(metrics_path) -> List[dict]:
    """The gold-vs-proxy monitor's points of a run (``metrics.jsonl`` rows of split
    ``monitor``, docs/monitor.md): step, d, proxy, gold, gold_se, kl, in step order."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    keys = ("step", "d", "proxy", "gold", "gold_se", "kl")
    return [{k: r[k] for k in keys if k in r} for r in read_metrics(path) if r.get("split") == "monitor"]


def plot_gold_proxy(curves: Mapping[str, Sequence[dict]], out_png, fits: Optional[Mapping[str, dict]] = None) -> Path:
    """Two panels against d = sqrt(KL to the initial policy): gold reward (left, with its
    standard error) and proxy reward (right), one line per run (``{"d", "gold", "proxy",
    ["gold_se"]}`` points). ``fits``: optional per-run fitted forms (aligner.evaluation
    .overoptimization.Fit.to_dict()) drawn dotted on the gold panel."""
    plt = _pyplot()
    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, points) in enumerate(curves.items()):
        if not points:
            continue
        color = f"C{i}"
        d = [p["d"] for p in points]
        ax_gold.errorbar(d, [p["gold"] for p in points], yerr=[p.get("gold_se") or 0.0 for p in points], fmt="o-",
                         color=color, label=name, markersize=3, capsize=2)
        ax_proxy.plot(d, [p["proxy"] for p in points], "s--", color=color, label=name, markersize=3)
        if fits and fits.get(name):
            f = Fit(**{k: fits[name][k] for k in ("form", "alpha", "beta", "rmse", "points", "d_peak", "gold_peak")})
            xs = [max(d) * j / 60 for j in range(1, 61)]
            base = points[0]["gold"]
            ax_gold.plot(xs, [base + float(f.predict(x)) for x in xs], ":", color=color)
    ax_gold.set_title("gold reward")
    ax_proxy.set_title("proxy reward")
    for ax in (ax_gold, ax_proxy):
        ax.set_xlabel("d = sqrt(KL(policy || initial))")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
