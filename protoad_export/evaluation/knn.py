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
from ..clustering.neighbours import nearest_similarity
from ..errors import InputError
from ..runtime.base import Runtime

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
