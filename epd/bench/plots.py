"""PNG figures of ``epd bench serve`` results (matplotlib, headless ``Agg`` backend).

- ``attainment_vs_rate``: SLO attainment (%) against request rate (req/s), one line per
  deployment, the 90 % target and each deployment's goodput marked.
- ``latency_cdf``: empirical CDFs of TTFT and TPOT (ms), one line per (deployment, rate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install 'epd-serve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attainment_vs_rate(series: dict[str, list[tuple[float, float]]], goodput: dict[str, float | None],
                       target: float, title: str, out: Path, how: dict[str, str] | None = None) -> Path:
    """Plot ``{label: [(rate req/s, attainment 0..1), …]}`` with the target line and each
    label's goodput (``how[label] == "lower-bound"`` is drawn as ``≥``); returns ``out``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, (label, pts) in enumerate(series.items()):
        pts = sorted(pts)
        line, = ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=label)
        g = goodput.get(label)
        if g is not None:
            ge = "≥ " if (how or {}).get(label) == "lower-bound" else ""
            ax.axvline(g, color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(f"{label}: goodput {ge}{g:.2f}", (g, target * 100), textcoords="offset points",
                        xytext=(-4, -16 - 13 * i), ha="right", fontsize=8, color=line.get_color())
    ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def latency_cdf(runs: dict[str, dict[str, list[float]]], title: str, out: Path) -> Path:
    """Two panels (TTFT, TPOT) of empirical CDFs; ``runs[label] = {"ttft": [ms…], "tpot": [ms…]}``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT (first token excluded)")):
        for label, vals in runs.items():
            v = np.sort(np.asarray(vals.get(key) or [], dtype=float))
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size * 100, where="post", label=label)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
