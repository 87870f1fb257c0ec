"""Decision thresholds: the normal hold-out kept back by ``build`` and ``calibrate``.

Decision rule everywhere in protoad-export: an image is **defective when its score is strictly
greater than the threshold**; a pixel of the anomaly map is defective on the same rule.

Two ways to set the threshold:

* ``frr`` (default): from the normal hold-out scores recorded by ``build``. The threshold is the
  empirical ``1 - target_frr`` quantile with the *inverted CDF* rule (no interpolation): the
  k-th smallest score with ``k = ceil((1 - target_frr) * n)``. It is always an observed score and
  at most ``floor(target_frr * n)`` hold-out images lie above it, so the empirical false-reject
  rate never exceeds the target. With fewer than ``1 / target_frr`` scores the target cannot be
  resolved: the threshold is then the largest hold-out score (empirical FRR 0) and the result says
  so (``resolved: false``). ``frr_upper_95`` is the one-sided 95 % Clopper-Pearson bound on the
  true FRR given the observed rejects, which shows how little a small hold-out proves.
* ``f1``: given labelled test images, the threshold maximising F1 of the defective class; the
  candidates are midpoints between consecutive distinct scores (ties: the highest threshold wins,
  i.e. fewer false rejects). The F1 it reports is measured on the images it was chosen on, so it
  is optimistic; an unbiased figure needs other labelled images (``eval``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ..contract import DECISION_RULE, check_threshold
from ..errors import ArtifactError, InputError



# --------------------------------------------------------------------------------------------
# Threshold rules


@dataclass
class Threshold:
    """A decision threshold and how it was chosen (stored in the manifest under ``threshold``)."""

    value: float
    method: str  # "frr", "f1" or "manual"
    rule: str = DECISION_RULE
    details: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return d


def _clopper_pearson_upper(rejects: int, n: int, level: float = 0.95) -> float:
    from scipy.stats import beta

    return 1.0 if rejects >= n else float(beta.ppf(level, rejects + 1, n - rejects))


def frr_threshold(normal_scores: Sequence[float], target_frr: float = 0.01) -> Threshold:
    """Threshold from normal scores for a target false-reject rate (see the module docstring)."""
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if not 0.0 <= target_frr < 1.0:
        raise InputError(f"target FRR must be in [0, 1), got {target_frr}")
    if scores.size == 0:
        raise InputError("no normal hold-out scores: rebuild with --holdout > 0, or calibrate with --data")
    if not np.isfinite(scores).all():
        raise InputError("hold-out scores contain NaN or infinite values")
    n = scores.size
    # The epsilon keeps (1 - 0.01) * 100 = 99.00000000000001 from rounding up to 100.
    k = max(1, math.ceil((1.0 - target_frr) * n - 1e-9))
    value = float(scores[k - 1])
    rejects = int(np.count_nonzero(scores > value))
    return Threshold(value, "frr", details={
        "target_frr": float(target_frr),
        "normal_scores": int(n),
        "empirical_frr": rejects / n,
        "frr_upper_95": _clopper_pearson_upper(rejects, n),
        "resolved": bool(target_frr * n >= 1.0 or target_frr == 0.0),
        "quantile_rule": "inverted CDF: k-th smallest score, k = ceil((1 - target_frr) * n)",
    })


def f1_threshold(labels: Sequence[int], scores: Sequence[float]) -> Threshold:
    """F1-optimal threshold for labelled images (1 = defective), on the rule score > threshold."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise InputError(f"{labels.size} labels but {scores.size} scores")
    if not np.isfinite(scores).all():
        raise InputError("image scores contain NaN or infinite values: no threshold can be chosen")
    if labels.all() or not labels.any():
        raise InputError("an F1 threshold needs both defective and good labelled images")
    distinct = np.unique(scores)
    below_all = distinct[0] - max(1e-6, 1e-6 * abs(distinct[0]))
    candidates = np.concatenate(([below_all], (distinct[1:] + distinct[:-1]) / 2))
    predicted = scores[None, :] > candidates[:, None]
    tp = (predicted & labels).sum(axis=1)
    fp = (predicted & ~labels).sum(axis=1)
    fn = labels.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = np.flatnonzero(f1 == f1.max())[-1]
    precision = tp[best] / max(tp[best] + fp[best], 1)
    recall = tp[best] / labels.sum()
    normal = scores[~labels]
    return Threshold(float(candidates[best]), "f1", details={
        "f1": float(f1[best]), "precision": float(precision), "recall": float(recall),
        "images": int(labels.size), "defective": int(labels.sum()),
        "empirical_frr": float(np.mean(normal > candidates[best])),
    })


# --------------------------------------------------------------------------------------------
# Bundles


def calibrate(
    bundle_dir: str | Path,
    target_frr: float = 0.01,
    data: str | Path | None = None,
    backend: str = "onnxruntime",
    batch_size: int = 8,
    progress: bool = False,
) -> Threshold:
    """Set and store an engine's threshold: from the hold-out (``target_frr``) or, with ``data``, F1-optimal.

    The threshold is written into the manifest (atomically), so the bundle carries it.
    """
    from ..bundle import add_files_to_manifest, read_manifest

    manifest = read_manifest(bundle_dir, verify=True)
    if data is None:
        holdout = manifest.get("holdout")
        if not holdout or not holdout.get("scores"):
            reason = (holdout or {}).get("empty_reason")
            if reason is None and holdout and holdout.get("skipped"):
                reason = f"all {len(holdout['skipped'])} held-out images were unreadable"
            raise ArtifactError(
                f"{bundle_dir} has no hold-out scores ({reason or 'built with --holdout 0 or by an older version'}): "
                "rebuild, or calibrate with --data CATEGORY, or give predict a --threshold"
            )
        threshold = frr_threshold(holdout["scores"], target_frr)
        threshold.details["source"] = f"build hold-out ({holdout['network']})"
    else:
        from ..data.datasets import category_test_set
        from ..runtime import load, predict_paths

        samples = category_test_set(data, require_masks=False)
        runtime = load(bundle_dir, backend)
        preds = predict_paths(runtime, [s.path for s in samples], batch_size, progress=progress)
        threshold = f1_threshold([s.label for s in samples], preds.scores)
        threshold.details.update(source=str(Path(data).resolve()), backend=backend)
    check_threshold(threshold.value, f"calibrated on {threshold.details.get('source', 'the hold-out')}")
    add_files_to_manifest(bundle_dir, [], {"threshold": threshold.to_dict()})
    return threshold
