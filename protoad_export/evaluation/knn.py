"""The exact kNN memory-bank baseline (PatchCore without coreset subsampling) as a runtime.

Every patch of the bundle's fitting images in a memory bank, anomaly = 1 - max cosine to the bank,
then the network's own upsampling, blur and max (``model.network.ScoreTail``). It takes the
bundle's input contract like any backend, so ``runtime.predict_paths`` runs it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.datasets import evenly_spaced, training_images
from ..errors import InputError
from ..runtime.base import Runtime

CPU_TILE = 1024  # rows and bank rows per tile of the search on a CPU (nearest_similarity)


def bank_images(manifest: dict, max_images: int | None = None) -> list[Path]:
    """The bundle's fitting images (training folder minus hold-out and skipped), evenly subsampled to ``max_images``."""
    data = Path(manifest["train"]["data"])
    if not data.exists():
        raise InputError(f"the kNN baseline needs the bundle's training images, not found at {data}")
    excluded = set(manifest.get("holdout", {}).get("images", [])) | set(manifest["train"].get("skipped", []))
    paths = [p for p in training_images(data) if p.name not in excluded]
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"baseline_train_images must be >= 1, got {max_images}")
        paths = evenly_spaced(paths, min(max_images, len(paths)))
    return paths


def nearest_similarity(queries, bank, query_block: int | None = None, bank_block: int | None = None, *,
                       kernel: str | None = None, bank_low=None):
    """Max cosine of each unit query row [Q, C] to the unit ``bank`` rows [M, C] (torch tensors, same
    device), exactly, in blocks of at most query_block x bank_block similarities.

    On a CPU the products run in the fastest dense kernel measured (``kernels.choose``, or
    ``kernel``); a low-precision one's candidates within its error bound are re-scored in FP32
    (``neighbours.rescore_candidates``), so the result is FP32's. ``bank_low``: the bank already
    in that kernel's dtype (saves a conversion per call).

    On a CPU the default tiles (1024 x 1024) keep the 4 MiB of similarities in cache between the
    product and its row maxima, about twice the speed of 4096 x 16384 blocks
    (benchmarks/results/knn_tiles.md). A GPU gets large blocks (kernel launches limit it there).
    """
    import torch

    from ..clustering import kernels
    from ..clustering.neighbours import rescore_candidates

    cpu = queries.device.type == "cpu"
    query_block = query_block or (CPU_TILE if cpu else 4096)
    bank_block = bank_block or (CPU_TILE if cpu else 16384)
    kern = kernels.choose(bank.shape[1], family="dense", force=kernel).name if cpu else "fp32"
    if kern != "fp32":
        dtype = kernels.dense_dtype(kern)
        bank_low = bank.to(dtype) if bank_low is None or bank_low.dtype != dtype else bank_low
        err = kernels.dense_error(kern, bank.shape[1])
    best = torch.full((len(queries),), -torch.inf, device=queries.device)
    for q in range(0, len(queries), query_block):
        rows = queries[q : q + query_block]
        rows_low = rows.to(bank_low.dtype) if kern != "fp32" else None
        for b in range(0, len(bank), bank_block):
            if kern == "fp32":
                sim = (rows @ bank[b : b + bank_block].T).amax(dim=1)
            else:
                approx = (rows_low @ bank_low[b : b + bank_block].T).float()
                sim = rescore_candidates(approx, rows, bank[b : b + bank_block], best[q : q + query_block], err).amax(dim=1)
            best[q : q + query_block] = torch.maximum(best[q : q + query_block], sim)
    return best


class KnnBaseline(Runtime):
    """Exact nearest-neighbour memory bank over all patches of ``paths`` (no subsampling), or over
    the given unit ``bank`` rows float32 [M, C] (e.g. the bundle's prototypes: the network's numbers
    searched in cache-sized tiles, without its [B, K, h, w] similarity tensor)."""

    backend = "knn"

    def __init__(self, bundle_dir: str | Path, manifest: dict, paths: Sequence[Path] = (), *, device: str = "cpu",
                 batch_size: int = 8, progress: bool = False, bank: np.ndarray | None = None) -> None:
        import torch

        from ..clustering.neighbours import as_float32
        from ..model.features import FeatureExtractor, extract_features
        from ..model.network import ScoreTail
        from ..runtime.pytorch import build_torch_network

        super().__init__(manifest)
        self.torch = torch
        self.device = torch.device(device)
        net = build_torch_network(bundle_dir, manifest, "fp32")
        self.frames = getattr(net, "frames", None)  # a frames bundle: the graph's own frame input
        protoad = getattr(net, "network", net)
        self.extractor = FeatureExtractor(protoad.patch_features, self.preprocessing).to(self.device).eval()
        width, height = self.preprocessing.input_size
        self.tail = ScoreTail(height, width).to(self.device)
        if self.frames is not None:
            self.frames = self.frames.to(self.device)
        t0 = time.perf_counter()
        if bank is not None:
            self.bank, self.images = torch.from_numpy(np.asarray(bank, dtype=np.float32)).to(self.device), 0
        else:
            with tempfile.TemporaryDirectory(prefix="protoad-knn-") as tmp, torch.no_grad():
                # Stored as FP16 like the features the prototypes were fitted on, then searched in FP32.
                feats = extract_features(self.extractor, list(paths), self.preprocessing, Path(tmp) / "bank.npy",
                                         batch_size=batch_size, device=self.device, progress=progress, desc="kNN bank")
                self.bank = torch.from_numpy(as_float32(feats.array)).to(self.device)
                self.images = len(feats.used)
                del feats
        self.bank_seconds = time.perf_counter() - t0
        self.kernel = "fp32"
        self.bank_low = None  # the bank in the dense kernel's dtype, converted once
        if self.device.type == "cpu":
            from ..clustering import kernels

            self.kernel = kernels.choose(self.bank.shape[1], family="dense").name
            if self.kernel != "fp32":
                self.bank_low = self.bank.to(kernels.dense_dtype(self.kernel))

    def _run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(inputs).to(self.device)
            if self.frames is not None:
                x = self.frames(x)
            feats = self.extractor(x)
            b, c, h, w = feats.shape
            sim = nearest_similarity(feats.permute(0, 2, 3, 1).reshape(-1, c), self.bank, bank_low=self.bank_low)
            maps, scores = self.tail((1.0 - sim).view(b, 1, h, w))
        return maps[:, 0].cpu().numpy(), scores.cpu().numpy()

    def info(self) -> dict:
        rows, dim = self.bank.shape
        return {"bank_images": self.images, "bank_patches": int(rows), "dim": int(dim),
                "bank_mib_fp32": round(rows * dim * 4 / 2**20, 1), "bank_seconds": round(self.bank_seconds, 2),
                "search": f"exact, blocked torch matmul on {self.device.type}", "product_kernel": self.kernel}
