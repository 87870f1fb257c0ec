"""``verify``: accept a bundle on the target machine against the golden outputs stored at build time.

Polygraphy's ``--load-outputs`` comparison, built in: each backend runs on ``golden/inputs.npy``
(checked by sha256 through the manifest, as are the reference outputs) and is compared elementwise
with the PyTorch FP32 outputs, ``|out - ref| <= atol + rtol * |ref|``. Reported per output: max,
mean, median and p99 absolute error; the largest score difference; and the decisions that flip at
the bundle's stored threshold. A flip is reported, not failed on by itself: a golden row whose
reference score lies within the tolerance of the threshold may flip on any correct backend.

Imports neither torch nor the backbone (what a line PC without PyTorch runs), unless a ``torch``
backend is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import atomic_write_json, load_array, read_manifest
from ..contract import InputContract, manifest_threshold, output_shapes
from ..errors import ArtifactError, InputError, ProtoADError, ToleranceError
from ..options import BACKEND_SPECS, DEFAULT_TOLERANCES

DEFAULT_BACKENDS = ("onnxruntime", "onnxruntime-fp16")


def load_golden(bundle_dir: str | Path, manifest: dict) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
    """(inputs, {output name: reference}, row descriptions), every file checked by sha256;
    a missing, tampered or inconsistent golden file is refused with its name."""
    entry = manifest.get("golden")
    if not isinstance(entry, dict) or "inputs" not in entry or "outputs" not in entry:
        raise ArtifactError(f"{bundle_dir} has no golden outputs (built before they were stored): rebuild it to verify it")
    inputs = load_array(bundle_dir, manifest, entry["inputs"])
    contract = InputContract.from_manifest(manifest)
    try:
        contract.check(inputs)
    except InputError as exc:
        raise ArtifactError(f"{Path(bundle_dir) / entry['inputs']}: {exc}") from None
    expected = output_shapes(contract, len(inputs))
    outputs = {}
    for name, shape in expected.items():
        if name not in entry["outputs"]:
            raise ArtifactError(f"{bundle_dir}: the manifest's golden entry has no {name} file")
        array = load_array(bundle_dir, manifest, entry["outputs"][name])
        if array.shape != shape or array.dtype != np.float32:
            raise ArtifactError(f"{Path(bundle_dir) / entry['outputs'][name]}: {array.dtype} {list(array.shape)}, "
                                f"expected float32 {list(shape)}")
        outputs[name] = array
    rows = entry.get("rows") or [{} for _ in range(len(inputs))]
    return inputs, outputs, rows


def error_stats(out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Absolute error statistics of ``out`` against ``ref`` and the elementwise tolerance check."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    err = np.abs(out64 - ref64)
    inside = err <= atol + rtol * np.abs(ref64)  # False for NaN
    finite = bool(np.isfinite(out64).all())
    # Statistics of the finite errors; non-finite outputs fail on their own.
    shown = err[np.isfinite(err)]
    shown = shown if shown.size else np.zeros(1)
    return {
        "max_abs": float(shown.max()), "mean_abs": float(shown.mean()),
        "median_abs": float(np.median(shown)), "p99_abs": float(np.percentile(shown, 99)),
        "finite": finite, "allclose": finite and bool(inside.all()), "outside": int(np.count_nonzero(~inside)),
    }


def _label(row: dict, index: int) -> str:
    what = row.get("image", f"row {index}")
    return f"{what} ({row['synthetic']})" if row.get("synthetic") else str(what)


def compare(name: str, outputs: dict[str, np.ndarray], golden: dict[str, np.ndarray], rows: list[dict],
            threshold: float | None, atol: float, rtol: float) -> dict[str, Any]:
    """One backend's outputs against the golden ones: statistics, largest score difference, flips."""
    stats = {k: error_stats(outputs[k], golden[k], atol, rtol) for k in golden}
    diff = np.abs(outputs["score"].astype(np.float64) - golden["score"])
    worst = int(np.argmax(np.where(np.isfinite(diff), diff, np.inf)))
    largest = {"row": worst, "image": _label(rows[worst], worst), "reference": float(golden["score"][worst]),
               "value": float(outputs["score"][worst]), "difference": float(diff[worst])}
    flips = []
    if threshold is not None:
        ref_dec, dec = golden["score"] > threshold, outputs["score"] > threshold
        flips = [{"row": int(i), "image": _label(rows[i], i), "reference": float(golden["score"][i]),
                  "value": float(outputs["score"][i]), "reference_defective": bool(ref_dec[i]),
                  "defective": bool(dec[i])} for i in np.flatnonzero(ref_dec != dec)]
    failures = []
    for k, s in stats.items():
        if not s["finite"]:
            failures.append(f"{k} has non-finite values")
        elif not s["allclose"]:
            failures.append(f"{k}: {s['outside']} values past atol {atol:g} + rtol {rtol:g} x |ref| "
                            f"(max error {s['max_abs']:.3g})")
    return {"backend": name, "precision": BACKEND_SPECS[name][1], "atol": atol, "rtol": rtol, "outputs": stats,
            "largest_score_difference": largest, "flips": flips, "failures": failures, "passed": not failures}


def _run(runtime, inputs: np.ndarray) -> dict[str, np.ndarray]:
    from ..runtime import fitting_batch

    step = fitting_batch(runtime.manifest, len(inputs))
    maps, scores = zip(*(runtime.predict(inputs[i : i + step]) for i in range(0, len(inputs), step)))
    return {"anomaly_map": np.concatenate(maps)[:, None], "score": np.concatenate(scores)}


def _open(bundle_dir: Path, name: str):
    from ..runtime import load

    backend, precision, compiled = BACKEND_SPECS[name]
    if backend == "torch":
        return load(bundle_dir, "torch", precision=precision, device="cuda" if precision == "fp16" else "cpu",
                    compile=compiled)
    return load(bundle_dir, backend, precision=precision)


def verify(bundle_dir: str | Path, backends: Sequence[str] = DEFAULT_BACKENDS, *, atol: float | None = None,
           rtol: float | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run each backend on the bundle's golden inputs and compare with the stored FP32 outputs.

    Returns the report; raise it with :func:`check_report` after printing it. ``atol``/``rtol``
    default per precision (``options.DEFAULT_TOLERANCES``).
    """
    log = log or (lambda _msg: None)
    bundle_dir = Path(bundle_dir)
    backends = list(dict.fromkeys(backends or DEFAULT_BACKENDS))
    unknown = [b for b in backends if b not in BACKEND_SPECS]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r}: choose from {', '.join(BACKEND_SPECS)}")
    manifest = read_manifest(bundle_dir, verify=False)
    inputs, golden, rows = load_golden(bundle_dir, manifest)
    threshold = manifest_threshold(manifest)
    report: dict[str, Any] = {
        "bundle": str(bundle_dir), "input": InputContract.from_manifest(manifest).describe(),
        "golden": {"count": len(inputs), "rows": rows, "reference": manifest["golden"].get("reference")},
        "threshold": threshold, "results": [], "not_run": {},
    }
    log(f"verify: {len(inputs)} golden inputs of {report['input']}, threshold "
        f"{'none (not calibrated)' if threshold is None else f'{threshold:.6g}'}")
    for name in backends:
        try:
            runtime = _open(bundle_dir, name)
        except ProtoADError as exc:
            report["not_run"][name] = {"error": str(exc), "exit_code": exc.exit_code}
            continue
        a, r = DEFAULT_TOLERANCES[BACKEND_SPECS[name][1]]
        result = compare(name, _run(runtime, inputs), golden, rows, threshold,
                         a if atol is None else atol, r if rtol is None else rtol)
        result["providers"] = getattr(runtime, "providers", None)
        report["results"].append(result)
    return report


def check_report(report: dict[str, Any]) -> None:
    """After the report is out: ToleranceError (exit 5) naming every backend past a tolerance, else
    the error of a backend that could not run (its own exit code: 4 missing, 3 bundle problem)."""
    failed = [f"{r['backend']}: {'; '.join(r['failures'])}" for r in report["results"] if not r["passed"]]
    if failed:
        raise ToleranceError("verify failed: " + " | ".join(failed))
    if report["not_run"]:
        name, entry = next(iter(report["not_run"].items()))
        error = ProtoADError(f"backend not run: {name}: {entry['error']}")
        error.exit_code = entry["exit_code"]
        raise error


def format_report(report: dict[str, Any]) -> str:
    """The report as a terminal table."""
    lines = [f"  {'backend':<18} {'output':<12} {'max':>9} {'mean':>9} {'median':>9} {'p99':>9}  result"
             " (absolute errors)"] if report["results"] else []
    for r in report["results"]:
        result = "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        for i, (k, s) in enumerate(r["outputs"].items()):
            lines.append(f"  {r['backend'] if i == 0 else '':<18} {k:<12} {s['max_abs']:9.2e} {s['mean_abs']:9.2e} "
                         f"{s['median_abs']:9.2e} {s['p99_abs']:9.2e}  {result if i == 0 else ''}")
        big = r["largest_score_difference"]
        lines.append(f"  {'':<18} largest score difference {big['difference']:.3g} on {big['image']} "
                     f"({big['reference']:.6g} -> {big['value']:.6g}); atol {r['atol']:g}, rtol {r['rtol']:g}")
        if report["threshold"] is None:
            lines.append(f"  {'':<18} decisions: no threshold stored (run calibrate)")
        elif not r["flips"]:
            lines.append(f"  {'':<18} decisions: none flips at {report['threshold']:.6g}")
        for f in r["flips"]:
            lines.append(f"  {'':<18} decision flips on {f['image']}: "
                         f"{'defective' if f['reference_defective'] else 'good'} -> "
                         f"{'defective' if f['defective'] else 'good'} ({f['reference']:.6g} -> {f['value']:.6g})")
    for name, entry in report["not_run"].items():
        lines.append(f"  {name:<18} not run: {entry['error']}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON (atomically)."""
    atomic_write_json(path, report)
