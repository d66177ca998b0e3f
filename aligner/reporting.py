"""Run reports: loss-curve and score-distribution plots (PNG) and a Markdown summary.

Reads the ``metrics.jsonl`` files the training loop writes; plotting uses matplotlib's
non-interactive Agg backend, so it works on headless nodes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence


def read_metrics(path) -> List[dict]:
    """The rows of a ``metrics.jsonl`` (errors name file and line)."""
    from aligner.data.datasets import iter_json_objects

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
