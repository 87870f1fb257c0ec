"""Measurements behind the build defaults (issue #2), on the real magnetic-tile category.

Stages (each caches its results under ``--cache`` and writes ``<cache>/<stage>.json``):

  fit      CONFIG   train features (every 8th train/good image) + FINCH (max 10,000) -> raw and
                    re-normalised prototypes
  score    CONFIG   one pass over the test set: pre-norm sum-of-squares statistics, max cosine per
                    patch for each prototype variant (and the FP16 simulations for --fp16), then
                    the network's own tail (model.network.ScoreTail: bilinear upsample, blur, max) and the metrics
  rescore  CONFIG   metrics on every n-th test image from a full score run's cached values (--every)
  wrn               sum-of-squares statistics of wide_resnet50_2 with random weights (a proxy)
  e2e      CONFIG   the real ProtoADNetwork: torch FP32 vs ONNX Runtime FP32 vs ONNX Runtime FP16
  report            render the tables of benchmarks/results/build_options.md from the JSON files

CONFIG is ``<mode>-<align>``, e.g. ``crop-bilinear``. ``benchmarks/build_options_run.sh`` runs
every stage as used for ``benchmarks/results/build_options.md`` (one lock acquisition; a rerun resumes), e.g.:

  flock /tmp/protoad-bench.lock python benchmarks/build_options.py fit crop-bilinear
  flock /tmp/protoad-bench.lock python benchmarks/build_options.py score crop-bilinear --fp16
  python benchmarks/build_options.py report --out /tmp/tables.md

Scoring on cached per-patch maxima is exact for the network's formula: the conv + channel max
only needs max_k <u, p_k> per patch; upsample, blur and score use network.ScoreTail and
F.interpolate exactly as ProtoADNetwork.forward. FP16 output rounding commutes with the max
(rounding to nearest is monotone), so max_k fp16(c_k - 1) == fp16(max_k c_k - 1) exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from protoad_export.contract import InputContract
from protoad_export.evaluation import metrics
from protoad_export.model.backbones import get_spec, load_backbone
from protoad_export.model.features import FeatureExtractor, Normalize, PatchFeatures, extract_features, l2_normalize
from protoad_export.data.images import Preprocessing, load_batch, load_mask
from protoad_export.data.datasets import category_test_set, training_images
from protoad_export.model.network import ProtoADNetwork, ScoreTail, patch_grid
from protoad_export.clustering.prototypes import PAPER_MAX_PROTOTYPES, fit_prototypes

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", REPO.parent / "shared" / "data")) / "magnetic_tile"
TRAIN_STEP = 8
TEST_EVERY = 1
CROP = 224
FP16_MAX = 65504.0
RESULTS_MD = REPO / "benchmarks" / "results" / "build_options.md"


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_config(cfg: str) -> tuple[str, str]:
    mode, align = cfg.split("-")
    return mode, align


def prep_for(mode: str, backbone: str = "efficientnet_lite0") -> Preprocessing:
    return get_spec(backbone).preprocessing(Preprocessing(resize=256, crop=CROP, mode=mode))


def train_paths() -> list[Path]:
    return training_images(DATA)[::TRAIN_STEP]


def test_samples():
    """The test set, or every TEST_EVERY-th image of it (sorted by defect type, so stratified)."""
    return category_test_set(DATA)[::TEST_EVERY]


def patch_module(align: str, backbone: str = "efficientnet_lite0", weights: str | None = None) -> PatchFeatures:
    bb = load_backbone(backbone, weights)
    return PatchFeatures(bb.module, align, patch_grid(CROP, bb.spec.strides[0])).eval()


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))


# ---------------------------------------------------------------------------------------------- fit


def stage_fit(cache: Path, cfg: str) -> None:
    mode, align = parse_config(cfg)
    prep = prep_for(mode)
    out = cache / cfg
    out.mkdir(parents=True, exist_ok=True)
    paths = train_paths()
    pf = patch_module(align)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ext = extract_features(FeatureExtractor(pf, prep), paths, prep, out / "train_features.npy", batch_size=16, progress=False)
    t_feat = time.perf_counter() - t0
    log(f"{cfg}: {ext.array.shape} train features in {t_feat:.0f} s")
    t0 = time.perf_counter()
    fit = fit_prototypes(ext.array, PAPER_MAX_PROTOTYPES, normalize=False, method="auto", log=log)
    t_fit = time.perf_counter() - t0
    raw = fit.prototypes
    norms = np.linalg.norm(raw, axis=1)
    np.savez(out / "prototypes.npz", raw=raw, norm=raw / np.maximum(norms[:, None], 1e-12))
    info = {
        "config": cfg, "train_images": len(ext.used), "patches": int(ext.array.shape[0]), "dim": int(ext.array.shape[1]),
        "prototypes": int(len(raw)), "partition_sizes": fit.finch.partition_sizes, "neighbours": fit.finch.neighbour_methods,
        "raw_norms": {"min": float(norms.min()), "p5": float(np.percentile(norms, 5)), "median": float(np.median(norms)), "max": float(norms.max())},
        "seconds": {"features": t_feat, "finch": t_fit},
    }
    save_json(out / "fit.json", info)
    del ext
    (out / "train_features.npy").unlink()
    log(f"{cfg}: {len(raw)} prototypes, partitions {fit.finch.partition_sizes}, {t_fit:.0f} s")


# -------------------------------------------------------------------------------------------- score


def tail(patch_scores: np.ndarray, score_tail: ScoreTail, chunk: int = 32) -> np.ndarray:
    """[N, h, w] patch anomaly scores (float32) -> [N, S, S] maps, the network's own tail."""
    out = np.empty((len(patch_scores), CROP, CROP), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(patch_scores), chunk):
            x = torch.from_numpy(np.ascontiguousarray(patch_scores[s : s + chunk], dtype=np.float32))[:, None]
            out[s : s + chunk] = score_tail(x)[0][:, 0].numpy()
    return out


def fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def test_masks(samples, prep: Preprocessing) -> np.ndarray:
    masks = np.zeros((len(samples), CROP, CROP), dtype=bool)
    for i, s in enumerate(samples):
        if s.mask_path is not None:
            masks[i] = prep.mask_array(load_mask(s.mask_path))
    return masks


def crop_loss(samples, prep: Preprocessing) -> dict:
    """How much of each defect mask the centre crop cuts away (counted at the resized scale)."""
    from scipy import ndimage

    per_image = []
    regions_total = regions_lost = 0
    for s in samples:
        if s.mask_path is None:
            continue
        mask = load_mask(s.mask_path)
        size, box, _ = prep.geometry(*mask.size)
        full = np.asarray(mask.resize(size, Image.NEAREST)) > 127
        inside = full[box[1] : box[3], box[0] : box[2]]
        total = int(full.sum())
        kept = int(inside.sum())
        lab, n = ndimage.label(full, structure=np.ones((3, 3)))
        if n:
            kept_labels = set(np.unique(lab[box[1] : box[3], box[0] : box[2]])) - {0}
            regions_total += n
            regions_lost += n - len(kept_labels)
        per_image.append((s.defect, total, kept))
    defective = len(per_image)
    nonempty = [(d, t, k) for d, t, k in per_image if t > 0]
    lost_any = [x for x in nonempty if x[2] < x[1]]
    lost_half = [x for x in nonempty if x[2] < 0.5 * x[1]]
    lost_all = [x for x in nonempty if x[2] == 0]
    by_type: dict[str, list[int]] = {}
    for d, t, k in nonempty:
        row = by_type.setdefault(d, [0, 0, 0, 0])
        row[0] += 1
        row[1] += int(k < t)
        row[2] += int(k == 0)
        row[3] += 0
    total_px = sum(t for _, t, _ in nonempty)
    kept_px = sum(k for _, _, k in nonempty)
    return {
        "defective_images": defective, "empty_masks": defective - len(nonempty), "masks_losing_pixels": len(lost_any),
        "masks_losing_over_half": len(lost_half), "masks_entirely_cropped": len(lost_all),
        "defect_pixels_lost_share": 1 - kept_px / max(total_px, 1), "regions": regions_total, "regions_entirely_cropped": regions_lost,
        "by_type": {d: {"masks": r[0], "losing_pixels": r[1], "entirely_cropped": r[2]} for d, r in sorted(by_type.items())},
    }


def common_frame(maps: np.ndarray, samples, mode: str, prep: Preprocessing, fill: float) -> np.ndarray:
    """Maps of any mode -> the full original image resampled to S x S (the 'squash' frame).

    letterbox: the valid (unpadded) area is resized to S x S; crop: the map is pasted into the
    resized image at the crop box (the rest gets ``fill``, the lowest score of the test set:
    defects there are never found), then resized to S x S. Bilinear; approximate at edges.
    """
    if mode == "squash":
        return maps
    out = np.empty_like(maps)
    for i, s in enumerate(samples):
        with Image.open(s.path) as im:
            size, box, offset = prep.geometry(*im.size)
        m = torch.from_numpy(maps[i])
        if mode == "letterbox":
            w, h = size
            canvas = m[offset[1] : offset[1] + h, offset[0] : offset[0] + w]
        else:
            w, h = size
            canvas = torch.full((h, w), fill, dtype=torch.float32)
            canvas[box[1] : box[3], box[0] : box[2]] = m
        out[i] = F.interpolate(canvas[None, None], size=(CROP, CROP), mode="bilinear", align_corners=False)[0, 0].numpy()
    return out


def evaluate(labels, masks, maps, scores) -> dict:
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "pro": metrics.pro_score(masks, maps),
    }


def stage_score(cache: Path, cfg: str, with_fp16: bool, batch: int = 8) -> None:
    mode, align = parse_config(cfg)
    prep = prep_for(mode)
    out = cache / cfg
    protos = dict(np.load(out / "prototypes.npz"))
    samples = test_samples()
    pf = patch_module(align)
    norm = Normalize(prep.mean, prep.std)
    grid = patch_grid(CROP)
    n = len(samples)
    maxcos = {k: np.empty((n, grid, grid), dtype=np.float32) for k in protos}
    maxcos_in16 = {k: np.empty((n, grid, grid), dtype=np.float32) for k in protos} if with_fp16 else {}
    sumsq = np.empty((n, grid, grid), dtype=np.float32)
    absmax = np.zeros(n, dtype=np.float32)
    P = {k: torch.from_numpy(v) for k, v in protos.items()}
    P16 = {k: torch.from_numpy(fp16(v)) for k, v in protos.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, batch):
            chunk = samples[s : s + batch]
            x = torch.from_numpy(load_batch([c.path for c in chunk], prep))
            feats = pf(norm(x)).float()
            sq = torch.sum(feats * feats, dim=1)
            sumsq[s : s + len(chunk)] = sq.numpy()
            absmax[s : s + len(chunk)] = feats.abs().amax(dim=(1, 2, 3)).numpy()
            unit = l2_normalize(feats)
            U = unit.permute(0, 2, 3, 1).reshape(-1, unit.shape[1])
            U16 = U.half().float()
            for k in protos:
                mc = torch.cat([(U[r : r + 4096] @ P[k].T).amax(dim=1) for r in range(0, len(U), 4096)])
                maxcos[k][s : s + len(chunk)] = mc.view(len(chunk), grid, grid).numpy()
                if with_fp16:
                    mc16 = torch.cat([(U16[r : r + 4096] @ P16[k].T).amax(dim=1) for r in range(0, len(U16), 4096)])
                    maxcos_in16[k][s : s + len(chunk)] = mc16.view(len(chunk), grid, grid).numpy()
            if s % (batch * 10) == 0:
                log(f"{cfg}: {s + len(chunk)}/{n} test images ({time.perf_counter() - t0:.0f} s)")
    t_pass = time.perf_counter() - t0
    np.savez(out / "test_patch.npz", sumsq=sumsq, **{f"maxcos_{k}": v for k, v in maxcos.items()},
             **{f"maxcos16_{k}": v for k, v in maxcos_in16.items()})

    result = score_variants(out, cfg, samples, maxcos, maxcos_in16, sumsq, absmax, with_fp16)
    result["seconds_test_pass"] = t_pass
    save_json(out / "score.json", result)


def score_variants(out: Path, cfg: str, samples, maxcos: dict, maxcos_in16: dict, sumsq, absmax, with_fp16: bool) -> dict:
    """Metrics of each prototype variant (and the FP16 study) from the per-patch maximum cosines."""
    mode, _ = parse_config(cfg)
    prep = prep_for(mode)
    n = len(samples)
    labels = np.array([s.label for s in samples])
    blur = ScoreTail(CROP)
    masks = test_masks(samples, prep)
    result = {"config": cfg, "test_images": n,
              "defect_pixels": int(masks.sum()), "defective_images_with_pixels": int((masks.reshape(n, -1).any(1)).sum()),
              "sumsq": sumsq_stats(sumsq, absmax), "variants": {}}
    squash_masks = test_masks(samples, prep_for("squash")) if mode != "squash" else masks
    if mode == "crop":
        result["crop_loss"] = crop_loss(samples, prep)
    for k in maxcos:
        patch = -(maxcos[k] - np.float32(1.0))  # conv with bias -1 in FP32, then negate
        maps = tail(patch, blur)
        scores = maps.reshape(n, -1).max(axis=1)
        entry = evaluate(labels, masks, maps, scores)
        fill = float(maps.min())
        cmaps = common_frame(maps, samples, mode, prep, fill)
        common = metrics.pixel_auroc(squash_masks, cmaps), metrics.pro_score(squash_masks, cmaps)
        entry["common_frame_pixel_auroc"], entry["common_frame_pro"] = common
        result["variants"][k] = entry
        log(f"{cfg} {k}: {entry}")
        if with_fp16:
            result.setdefault("fp16", {})[k] = fp16_study(maxcos[k], maxcos_in16[k], maps, scores, labels, masks, blur)
    return result


def stage_rescore(cache: Path, cfg: str, every: int) -> None:
    """Metrics on every n-th test image from a full-test-set score run's cached per-patch maxima."""
    out = cache / cfg
    samples = category_test_set(DATA)
    data = np.load(out / "test_patch.npz")
    assert len(data["sumsq"]) == len(samples), "rescore needs a score run on the full test set"
    keys = [k.split("_", 1)[1] for k in data.files if k.startswith("maxcos_")]
    maxcos = {k: data[f"maxcos_{k}"][::every] for k in keys}
    sumsq = data["sumsq"][::every]
    result = score_variants(out, cfg, samples[::every], maxcos, {}, sumsq, np.zeros(len(sumsq), dtype=np.float32), False)
    result["sumsq"]["max_abs_activation"] = None
    result["subset_every"] = every
    save_json(out / f"score_every{every}.json", result)


def sumsq_stats(sumsq: np.ndarray, absmax: np.ndarray) -> dict:
    flat = sumsq.ravel().astype(np.float64)
    return {
        "patches": int(flat.size), "max": float(flat.max()), "p99_9": float(np.percentile(flat, 99.9)),
        "p99": float(np.percentile(flat, 99)), "median": float(np.median(flat)),
        "share_over_fp16_max": float(np.mean(flat > FP16_MAX)), "max_abs_activation": float(absmax.max()),
    }


def fp16_study(mc: np.ndarray, mc_in16: np.ndarray, ref_maps, ref_scores, labels, masks, blur) -> dict:
    """FP16 output rounding (cos vs cos-1) and FP16 input rounding, each through the FP32 tail."""
    one = np.float32(1.0)
    variants = {
        "fp32 reference (cos-1 in FP32)": -(mc - one),
        "out FP16, cos then 1-x": one - fp16(mc),
        "out FP16, cos-1 (bias -1)": -fp16(mc - one),
        "in FP16, out FP32": -(mc_in16 - one),
        "in FP16, out FP16 cos then 1-x": one - fp16(mc_in16),
        "in FP16, out FP16 cos-1 (bias -1)": -fp16(mc_in16 - one),
    }
    ref_patch = variants["fp32 reference (cos-1 in FP32)"]
    out = {}
    for name, patch in variants.items():
        maps = tail(patch, blur)
        scores = maps.reshape(len(maps), -1).max(axis=1)
        out[name] = {
            "patch_max_err": float(np.abs(patch - ref_patch).max()),
            "map_max_err": float(np.abs(maps - ref_maps).max()), "map_mean_err": float(np.abs(maps - ref_maps).mean()),
            "score_max_err": float(np.abs(scores - ref_scores).max()), "score_mean_err": float(np.abs(scores - ref_scores).mean()),
            "image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "distinct_patch_values": int(np.unique(patch).size),
        }
        log(f"fp16 {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------- wrn


def stage_wrn(cache: Path, every: int) -> None:
    """wide_resnet50_2 with random (seeded) weights: per-patch sum of squares on real test images."""
    prep = prep_for("crop", "wide_resnet50_2")
    samples = category_test_set(DATA)[::every]
    pf = patch_module("bilinear", "wide_resnet50_2", "random")
    norm = Normalize(prep.mean, prep.std)
    sums, absmax, stage_max = [], [], [0.0, 0.0, 0.0]
    with torch.no_grad():
        for s in range(0, len(samples), 4):
            x = norm(torch.from_numpy(load_batch([c.path for c in samples[s : s + 4]], prep)))
            maps = pf.backbone(x)
            for i, m in enumerate(maps):
                stage_max[i] = max(stage_max[i], float(m.abs().max()))
            feats = pf(x).float()
            sums.append(torch.sum(feats * feats, dim=1).numpy())
            absmax.append(feats.abs().amax(dim=(1, 2, 3)).numpy())
    stats = sumsq_stats(np.concatenate(sums), np.concatenate(absmax))
    stats["stage_max_abs"] = stage_max
    stats["images"] = len(samples)
    # the same for efficientnet_lite0's stages (real weights), for the per-stage maxima
    pf = patch_module("bilinear")
    e_max = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for s in range(0, len(samples), 8):
            x = norm(torch.from_numpy(load_batch([c.path for c in samples[s : s + 8]], prep)))
            for i, m in enumerate(pf.backbone(x)):
                e_max[i] = max(e_max[i], float(m.abs().max()))
    save_json(cache / "wrn.json", {"wide_resnet50_2_random": stats, "efficientnet_lite0_stage_max_abs": e_max})
    log(f"wrn: {stats}")


# ---------------------------------------------------------------------------------------------- e2e


def count_ops(model) -> dict:
    import collections

    return dict(collections.Counter(n.op_type for n in model.graph.node))


def stage_e2e(cache: Path, cfg: str, variant: str, torch_every: int = 4, e2e_every: int = 2, batch: int = 8) -> None:
    import copy

    import onnx
    import onnxruntime as ort

    from protoad_export.export.onnx import export_onnx, inspect_graph

    mode, align = parse_config(cfg)
    prep = prep_for(mode)
    out = cache / cfg
    protos = np.load(out / "prototypes.npz")[variant]
    pf = patch_module(align)
    nets = {p: ProtoADNetwork(copy.deepcopy(pf), protos, prep, p).eval() for p in ("fp32", "fp16")}
    files = {}
    t0 = time.perf_counter()
    for p, net in nets.items():
        files[p] = out / f"model.{p}.onnx"
        if not files[p].exists():
            export_onnx(net, files[p], InputContract("tensor", net.size))
    t_export = time.perf_counter() - t0
    graph16 = inspect_graph(onnx.load(str(files["fp16"])))

    # ONNX Runtime InferenceSessions: default optimisation (ORT_ENABLE_ALL, as runtime.OnnxRuntime) for both graphs, and
    # the FP16 graph at ORT_ENABLE_EXTENDED, where the Casts ORT inserts around every FP16 op it runs in
    # float stay in the graph (so every activation is rounded to FP16 between ops).
    levels = {"fp32": ("fp32", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
              "fp16": ("fp16", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
              "fp16_ext": ("fp16", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)}
    runners = {}
    opt_info = {}
    for key, (p, level) in levels.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        so.graph_optimization_level = level
        opt_path = out / f"model.{key}.ort_optimized.onnx"
        so.optimized_model_filepath = str(opt_path)
        runners[key] = ort.InferenceSession(str(files[p]), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(opt_path))
        orig = onnx.load(str(files[p]))
        opt_info[key] = {"ops_exported": count_ops(orig), "ops_ort_optimized": count_ops(opt),
                         "casts_exported": count_ops(orig).get("Cast", 0), "casts_ort_optimized": count_ops(opt).get("Cast", 0)}
    # Which dtype does ORT CPU run the prototype conv in? Profile one FP16 run and read the kernel records.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(out / "ort_fp16_profile")
    prof_sess = ort.InferenceSession(str(files["fp16"]), so, providers=["CPUExecutionProvider"])
    prof_sess.run(None, {"image": np.random.rand(1, 3, CROP, CROP).astype(np.float32)})
    prof_file = prof_sess.end_profiling()
    prof = json.loads(Path(prof_file).read_text())
    kernels: dict[str, int] = {}
    for ev in prof:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            a = ev.get("args", {})
            key = f"{a.get('op_name')}:{a.get('input_type_shape', [{}])[0] and list(a['input_type_shape'][0].keys())[0]}"
            kernels[key] = kernels.get(key, 0) + 1
    opt_info["fp16_profile_kernels"] = kernels

    samples = test_samples()
    patch = np.load(out / "test_patch.npz")[f"maxcos_{variant}"]
    assert len(patch) == len(samples), "score and e2e must use the same --test-every"
    samples, patch = samples[::e2e_every], patch[::e2e_every]  # sorted by defect type: a stratified subset
    labels = np.array([s.label for s in samples])
    n = len(samples)
    # FP32 reference for every test image: the cached-feature path (the network's formula on the
    # very same features), checked against the torch module on every torch_every-th image.
    ref_m = tail(-(patch - np.float32(1.0)), ScoreTail(CROP))
    ref_s = ref_m.reshape(n, -1).max(axis=1)
    torch_idx = np.arange(0, n, torch_every)
    maps = {f"ort_{k}": np.empty((n, CROP, CROP), dtype=np.float32) for k in runners}
    scores = {k: np.empty(n, dtype=np.float32) for k in maps}
    torch_m = np.empty((len(torch_idx), CROP, CROP), dtype=np.float32)
    torch_s = np.empty(len(torch_idx), dtype=np.float32)
    secs = {"torch_fp32": 0.0, **{f"ort_{k}": 0.0 for k in runners}}
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, batch):
            x = load_batch([c.path for c in samples[s : s + batch]], prep)
            for p in runners:
                t = time.perf_counter()
                m, sc = runners[p].run(["anomaly_map", "score"], {"image": x})
                secs[f"ort_{p}"] += time.perf_counter() - t
                maps[f"ort_{p}"][s : s + len(x)] = m[:, 0]
                scores[f"ort_{p}"][s : s + len(x)] = sc
            if s % (batch * 10) == 0:
                log(f"e2e ort: {s + len(x)}/{n} ({time.perf_counter() - t0:.0f} s)")
        for s in range(0, len(torch_idx), batch):
            idx = torch_idx[s : s + batch]
            x = load_batch([samples[i].path for i in idx], prep)
            t = time.perf_counter()
            m, sc = nets["fp32"](torch.from_numpy(x))
            secs["torch_fp32"] += time.perf_counter() - t
            torch_m[s : s + len(x)] = m[:, 0].numpy()
            torch_s[s : s + len(x)] = sc.numpy()
    masks = test_masks(samples, prep)
    result = {"config": cfg, "prototypes": variant, "n_prototypes": int(len(protos)), "test_images": n,
              "torch_images": int(len(torch_idx)), "e2e_every": e2e_every, "torch_every": torch_every, "export_seconds": t_export,
              "graph_fp16": {"ops": graph16.ops, "casts": graph16.cast_targets,
                             "conv_dtypes": graph16.conv_dtypes, "problems": graph16.problems},
              "ort": opt_info, "runs": {}}
    result["torch_module_vs_cached_path"] = {
        "map_max_err": float(np.abs(torch_m - ref_m[torch_idx]).max()),
        "score_max_err": float(np.abs(torch_s - ref_s[torch_idx]).max()),
        "image_auroc_subset_torch": metrics.image_auroc(labels[torch_idx], torch_s) if 0 < labels[torch_idx].sum() < len(torch_idx) else None,
        "ms_per_image": 1000 * secs["torch_fp32"] / len(torch_idx),
    }
    log(f"torch module vs cached path: {result['torch_module_vs_cached_path']}")
    entry = evaluate(labels, masks, ref_m, ref_s)
    entry.update({"map_max_err_vs_fp32": 0.0, "map_mean_err_vs_fp32": 0.0, "score_max_err_vs_fp32": 0.0})
    result["runs"]["torch_fp32"] = entry
    for k in maps:
        entry = evaluate(labels, masks, maps[k], scores[k])
        entry.update({"map_max_err_vs_fp32": float(np.abs(maps[k] - ref_m).max()),
                      "map_mean_err_vs_fp32": float(np.abs(maps[k] - ref_m).mean()),
                      "score_max_err_vs_fp32": float(np.abs(scores[k] - ref_s).max()),
                      "score_mean_err_vs_fp32": float(np.abs(scores[k] - ref_s).mean()),
                      "map_max_err_vs_torch_module_subset": float(np.abs(maps[k][torch_idx] - torch_m).max()),
                      "ms_per_image": 1000 * secs[k] / n})
        result["runs"][k] = entry
        log(f"e2e {k}: {entry}")
    save_json(out / f"e2e_{variant}.json", result)


# ------------------------------------------------------------------------------------------- report


def machine() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores (shared by 4 engineers' jobs; runs serialised with flock)"


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _f(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def stage_report(cache: Path, out: Path) -> None:
    """Render the markdown tables from the JSON files (hand-written conclusions live in the md too)."""
    lines = []
    add = lines.append
    fits = {c: _load(cache / c / "fit.json") for c in ("crop-bilinear", "squash-bilinear", "letterbox-bilinear", "crop-nearest")}
    scores = {c: _load(cache / c / "score.json") for c in fits}
    base = scores["crop-bilinear"]
    # the side-by-side tables compare configurations on one test set: crop-bilinear re-scored on the subset
    side = dict(scores)
    sub = _load(cache / "crop-bilinear" / "score_every2.json")
    if sub and any(v and v["test_images"] == sub["test_images"] for c, v in scores.items() if c != "crop-bilinear"):
        side["crop-bilinear"] = sub
    add("### Prototype normalisation\n")
    add("| configuration | test images | prototypes | K | image AUROC % | pixel AUROC % | PRO (FPR<=0.3) % |")
    add("|---|---:|---|---:|---:|---:|---:|")
    rows = [("crop-bilinear", base)] + [(c, side[c]) for c in fits if side[c] is not base]
    for c, sc in rows:
        if sc is None:
            continue
        for k, label in (("raw", "raw cluster means (authors' code)"), ("norm", "re-normalised means")):
            v = sc["variants"][k]
            add(f"| {c} | {sc['test_images']} | {label} | {fits[c]['prototypes']} | {_pct(v['image_auroc'])} | {_pct(v['pixel_auroc'])} | {_pct(v['pro'])} |")
    for c, f in fits.items():
        if f:
            add(f"\n{c}: {f['train_images']} train images, {f['patches']:,} patches x {f['dim']}, FINCH partitions {f['partition_sizes']} "
                f"({'/'.join(f['neighbours'])} neighbours), raw prototype norms min {f['raw_norms']['min']:.3f} / p5 {f['raw_norms']['p5']:.3f} / "
                f"median {f['raw_norms']['median']:.3f} / max {f['raw_norms']['max']:.3f}; features {f['seconds']['features']:.0f} s, FINCH {f['seconds']['finch']:.0f} s.")
    add("\n### Resize modes (bilinear align)\n")
    add("Own frame: masks through the same transform as the images (crop: cropped masks; letterbox: padding counts as normal pixels). "
        "Common frame: every map mapped back onto the whole original image, resampled to 224x224 (the squash frame); "
        "for crop, pixels outside the crop get the test set's lowest score (never flagged).\n")
    add("| mode | test images | prototypes | image AUROC % | pixel AUROC % own | PRO % own | pixel AUROC % common | PRO % common | defect px (own frame) |")
    add("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for c in ("crop-bilinear", "squash-bilinear", "letterbox-bilinear"):
        if side[c] is None:
            continue
        for k in ("raw", "norm"):
            v = side[c]["variants"][k]
            add(f"| {c.split('-')[0]} | {side[c]['test_images']} | {k} | {_pct(v['image_auroc'])} | {_pct(v['pixel_auroc'])} | {_pct(v['pro'])} | "
                f"{_pct(v['common_frame_pixel_auroc'])} | {_pct(v['common_frame_pro'])} | {side[c]['defect_pixels']:,} |")
    if base and "crop_loss" in base:
        cl = base["crop_loss"]
        add(f"\nCentre crop (resize 256, crop 224) on the {cl['defective_images']} defective test images "
            f"({cl['empty_masks']} have empty masks): {cl['masks_losing_pixels']} masks lose pixels, {cl['masks_losing_over_half']} lose more than half, "
            f"{cl['masks_entirely_cropped']} are cropped away entirely; {100 * cl['defect_pixels_lost_share']:.1f} % of all defect pixels and "
            f"{cl['regions_entirely_cropped']} of {cl['regions']} defect regions (8-connected) lie outside the crop.\n")
        add("| defect type | masks (non-empty) | losing pixels | entirely cropped |")
        add("|---|---:|---:|---:|")
        for d, r in cl["by_type"].items():
            add(f"| {d} | {r['masks']} | {r['losing_pixels']} | {r['entirely_cropped']} |")
    add("\n### Align (crop)\n")
    add("| align | test images | prototypes | K | image AUROC % | pixel AUROC % | PRO % |")
    add("|---|---:|---|---:|---:|---:|---:|")
    for c in ("crop-bilinear", "crop-nearest"):
        if side[c] is None:
            continue
        for k in ("raw", "norm"):
            v = side[c]["variants"][k]
            add(f"| {c.split('-')[1]} | {side[c]['test_images']} | {k} | {fits[c]['prototypes']} | {_pct(v['image_auroc'])} | {_pct(v['pixel_auroc'])} | {_pct(v['pro'])} |")
    add("\n### FP16 (a): per-patch sum of squares over channels before the L2 norm\n")
    add("| backbone | patches | median | 99th pct | 99.9th pct | max | share > 65504 | max abs activation |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in fits:
        if scores[c]:
            q = scores[c]["sumsq"]
            add(f"| efficientnet_lite0, ImageNet weights, {c}, {scores[c]['test_images']} test images | {q['patches']:,} | {q['median']:.0f} | {q['p99']:.0f} | {q['p99_9']:.0f} | "
                f"{q['max']:.0f} | {q['share_over_fp16_max']:.2e} | {q['max_abs_activation']:.1f} |")
    wrn = _load(cache / "wrn.json")
    if wrn:
        q = wrn["wide_resnet50_2_random"]
        add(f"| wide_resnet50_2, RANDOM weights (proxy only), crop, {q['images']} test images | {q['patches']:,} | {q['median']:.3g} | {q['p99']:.3g} | "
            f"{q['p99_9']:.3g} | {q['max']:.3g} | {q['share_over_fp16_max']:.2e} | {q['max_abs_activation']:.3g} |")
        add(f"\nMax |activation| per stage: wide_resnet50_2 (random) {['%.3g' % v for v in q['stage_max_abs']]}, "
            f"efficientnet_lite0 {['%.3g' % v for v in wrn['efficientnet_lite0_stage_max_abs']]} (same images).")
    if base and "fp16" in base:
        add("\n### FP16 (b): prototype conv output rounding, simulated on real features (crop, bilinear)\n")
        add("Max cosine per patch computed in FP32 on the full test set; rounding applied as a fused kernel with FP32 "
            "accumulation and FP16 output would; tail (1-x, upsample, blur, score) in FP32 as in the network.\n")
        add("| prototypes | variant | patch max err | map max err | map mean err | score max err | score mean err | distinct patch values | image AUROC % | pixel AUROC % |")
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, rows in base["fp16"].items():
            for name, r in rows.items():
                add(f"| {k} | {name} | {r['patch_max_err']:.2e} | {r['map_max_err']:.2e} | {r['map_mean_err']:.2e} | {r['score_max_err']:.2e} | "
                    f"{r['score_mean_err']:.2e} | {r['distinct_patch_values']:,} | {_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} |")
    for variant in ("raw", "norm"):
        e = _load(cache / "crop-bilinear" / f"e2e_{variant}.json")
        if not e:
            continue
        add(f"\n### FP16 (c) and backends: PyTorch FP32 vs ONNX Runtime FP32 vs ONNX Runtime FP16 (crop, bilinear, {variant} prototypes, K={e['n_prototypes']})\n")
        add("| runtime | image AUROC % | pixel AUROC % | PRO % | map max err | map mean err | score max err | ms/image (2 shared cores) |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        tm = e["torch_module_vs_cached_path"]
        for k, label in (("torch_fp32", "PyTorch FP32 (CPU)"), ("ort_fp32", "ONNX Runtime FP32 (CPU EP)"),
                         ("ort_fp16", "ONNX Runtime FP16 graph (CPU EP, default ORT_ENABLE_ALL)"),
                         ("ort_fp16_ext", "ONNX Runtime FP16 graph (CPU EP, ORT_ENABLE_EXTENDED: FP16 between ops)")):
            if k not in e["runs"]:
                continue
            r = e["runs"][k]
            ms = tm["ms_per_image"] if k == "torch_fp32" else r["ms_per_image"]
            add(f"| {label} | {_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} | {_pct(r['pro'])} | {r['map_max_err_vs_fp32']:.2e} | "
                f"{r['map_mean_err_vs_fp32']:.2e} | {r['score_max_err_vs_fp32']:.2e} | {ms:.0f} |")
        add(f"\nErrors are against the FP32 reference on {e['test_images']} test images (1 in {e.get('e2e_every', 1)} of the test set, sorted by defect type, so stratified). The PyTorch FP32 row's metrics come from the cached-feature "
            f"computation (same PatchFeatures, same formula, network.GaussianBlur); the torch module itself ran on {e['torch_images']} images "
            f"(1 in {e.get('torch_every', 4)} of these) and matches it to {tm['map_max_err']:.1e} (map) / {tm['score_max_err']:.1e} (score); ONNX Runtime vs the torch "
            f"module on those images: FP32 {e['runs']['ort_fp32']['map_max_err_vs_torch_module_subset']:.1e}, "
            f"FP16 {e['runs']['ort_fp16']['map_max_err_vs_torch_module_subset']:.1e}.")
        o = e["ort"]
        add(f"\nONNX Runtime {_ort_version()} CPU on the FP16 graph: {o['fp16']['casts_exported']} Cast nodes exported, "
            f"{o['fp16']['casts_ort_optimized']} in ORT's optimised graph at ORT_ENABLE_ALL"
            f"{', %d at ORT_ENABLE_EXTENDED' % o['fp16_ext']['casts_ort_optimized'] if 'fp16_ext' in o else ''} (`optimized_model_filepath`); "
            f"profiled kernels (op:first input type): {o['fp16_profile_kernels']}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "?"


def main() -> None:
    global TRAIN_STEP, TEST_EVERY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("fit", "score", "rescore", "wrn", "e2e", "report"))
    ap.add_argument("config", nargs="?", default="crop-bilinear")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BUILD_OPTIONS_CACHE", "/tmp/build_options_cache")))
    ap.add_argument("--fp16", action="store_true", help="score: also the FP16 rounding simulations")
    ap.add_argument("--variant", default="raw", help="e2e: prototypes raw|norm")
    ap.add_argument("--e2e-every", type=int, default=2, help="e2e: every n-th test image for ONNX Runtime (default 2: 291 images)")
    ap.add_argument("--torch-every", type=int, default=4, help="e2e: run the torch module on every n-th test image")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "build_options_tables.md", help="report: output file")
    ap.add_argument("--every", type=int, default=9, help="wrn / rescore: every n-th test image")
    ap.add_argument("--train-step", type=int, default=8, help="every n-th train/good image (default 8)")
    ap.add_argument("--test-every", type=int, default=1, help="every n-th test image (default: all 582)")
    args = ap.parse_args()
    TRAIN_STEP, TEST_EVERY = args.train_step, args.test_every
    torch.set_num_threads(2)
    log(f"{args.stage} {args.config} on {machine()}")
    if args.stage == "fit":
        stage_fit(args.cache, args.config)
    elif args.stage == "score":
        stage_score(args.cache, args.config, args.fp16)
    elif args.stage == "wrn":
        stage_wrn(args.cache, args.every)
    elif args.stage == "rescore":
        stage_rescore(args.cache, args.config, args.every)
    elif args.stage == "report":
        stage_report(args.cache, args.out)
    elif args.stage == "e2e":
        stage_e2e(args.cache, args.config, args.variant, args.torch_every, args.e2e_every)


if __name__ == "__main__":
    main()
