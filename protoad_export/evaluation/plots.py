"""Evaluation plots as PNG (matplotlib, Agg backend: no display needed), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return str(path)


def write_plots(
    out_dir: str | Path,
    labels: np.ndarray,
    defects: Sequence[str],
    scores: dict[str, np.ndarray],
    threshold: float | None = None,
) -> dict[str, str]:
    """``roc.png`` (overall per method, per defect type for the first) and ``histogram.png`` (good vs defective)."""
    from sklearn.metrics import roc_curve

    plt = _figure()
    out_dir = Path(out_dir)
    labels = np.asarray(labels)
    defects = np.asarray(defects)
    names = list(scores)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name in names:
        fpr, tpr, _ = roc_curve(labels, scores[name])
        ax.plot(fpr, tpr, lw=2, label=f"{name} overall")
    main = scores[names[0]]
    for d in sorted(set(defects) - {"good"}):
        keep = (defects == "good") | (defects == d)
        fpr, tpr, _ = roc_curve(labels[keep], main[keep])
        ax.plot(fpr, tpr, lw=1, ls="--", label=f"{names[0]} {d}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set(xlabel="false-positive rate (good images rejected)", ylabel="true-positive rate",
           title="Image-level ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    paths = {"roc": _save(fig, out_dir / "roc.png")}

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = scores[name]
        bins = np.linspace(s.min(), s.max(), 40)
        ax.hist(s[labels == 0], bins=bins, alpha=0.6, label="good", color="tab:green")
        ax.hist(s[labels == 1], bins=bins, alpha=0.6, label="defective", color="tab:red")
        if threshold is not None and name == "protoad":
            ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4f}")
        ax.set(xlabel="image score", ylabel="images", title=f"{name}: image scores")
        ax.legend(fontsize=8)
    paths["histogram"] = _save(fig, out_dir / "histogram.png")
    return paths
