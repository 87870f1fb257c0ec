"""The complete ProtoAD inference network as one ``nn.Module``, traced whole into ONNX.

[0,1] RGB -> mean/std -> backbone stages 1-3 -> align + concat -> L2 norm -> 1x1 conv with the
prototypes -> channel max -> 1 - x -> bilinear upsample -> Gaussian blur -> (anomaly_map, score).

Precision plan for ``precision="fp16"`` (written into the graph as explicit casts, because
TensorRT 11 networks are strongly typed; measured in ``benchmarks/RESULTS.md``):

- mean/std in FP32, then FP16 for the backbone and the alignment: the bulk of the FLOPs besides
  the prototype conv, with activations far from FP16's range limits.
- L2 norm in FP32: FP16 overflows at 65504. With efficientnet_lite0 the per-patch sum of squares
  over 176 channels reached 2.5e4 on the magnetic tiles (2.7x headroom only); wide_resnet50_2's
  1792 channels (random weights, a proxy) reached 6.5e5 and overflowed on 30 % of the patches. So
  the features are cast up, normalised and cast back down.
- 1x1 conv in FP16 with a bias of -1: the conv yields cos - 1 instead of cos. Near 1, FP16 steps
  are 4.9e-4 (2^-11), which would quantise every anomaly score of a normal patch; values near 0
  keep FP16's relative precision. The bias is added in the accumulator of fused conv kernels
  (TensorRT, cuDNN), before rounding to FP16. Simulated on real features this cut the mean map
  error of the rounding 3x and kept 2.4x more distinct patch scores (benchmarks/RESULTS.md 5).
- channel max in FP16 (exact: it only selects), then FP32 for 1 - x, upsampling, blur and score:
  one channel, cheap, and the blur sums 33 taps.

The FP32 network uses the same formulation (conv with bias -1, max, negate), so both graphs have
the same structure and differ only in their casts.

Beyond ``PROTOTYPE_CHUNK`` prototypes the 1x1 conv is split into chunks, each followed by its own
channel max, and the chunks' maxima are combined by elementwise Max: the same numbers (max only
selects), but no [B, K, h, w] similarity tensor of the whole K, which is 115 MB per image in FP32
at the paper's ~9k prototypes and 2 GB (163k) to 7.9 GB (627k) at FINCH's finer levels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .features import Normalize, PatchFeatures, l2_normalize
from .search import TwoStage, TwoStageSearch
from ..data.images import Preprocessing

from ..options import PRECISIONS, PROTOTYPE_CHUNK
BLUR_SIGMA = 4.0
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def gaussian_taps(sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def symmetric_pad_index(length: int, radius: int) -> np.ndarray:
    """Gather indices that pad an axis the way scipy's mode 'reflect' does: (d c b a | a b c d | d c b a)."""
    idx = np.arange(-radius, length + radius)
    period = 2 * length
    idx = np.mod(idx, period)
    return np.where(idx >= length, period - 1 - idx, idx).astype(np.int64)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur equal to ``scipy.ndimage.gaussian_filter(x, sigma)`` on each [H, W] map.

    Padding is a Gather with constant indices (symmetric, which torch and ONNX lack: their 'reflect'
    is scipy's 'mirror'); the taps are two convolutions, 33x1 and 1x33, which TensorRT runs natively.
    """

    def __init__(self, height: int, width: int, sigma: float = BLUR_SIGMA) -> None:
        super().__init__()
        taps = torch.tensor(gaussian_taps(sigma), dtype=torch.float32)
        self.radius = (len(taps) - 1) // 2
        self.register_buffer("kernel_h", taps.view(1, 1, -1, 1).clone())
        self.register_buffer("kernel_w", taps.view(1, 1, 1, -1).clone())
        self.register_buffer("index_h", torch.from_numpy(symmetric_pad_index(height, self.radius)))
        self.register_buffer("index_w", torch.from_numpy(symmetric_pad_index(width, self.radius)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.index_select(x, 2, self.index_h)
        x = F.conv2d(x, self.kernel_h)
        x = torch.index_select(x, 3, self.index_w)
        return F.conv2d(x, self.kernel_w)


class ScoreTail(nn.Module):
    """Patch scores [B, 1, h, w] -> (anomaly_map [B, 1, H, W], score [B]): bilinear upsampling to the
    input size, the Gaussian blur, the map's maximum. Shared by the network and the kNN baseline.
    ``width`` None: square (``height`` x ``height``)."""

    def __init__(self, height: int, width: int | None = None) -> None:
        super().__init__()
        self.size = height
        self.width = height if width is None else width
        self.blur = GaussianBlur(height, self.width)

    def forward(self, patch_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        upsampled = F.interpolate(patch_scores, size=(self.size, self.width), mode="bilinear", align_corners=False)
        anomaly_map = self.blur(upsampled)
        return anomaly_map, torch.amax(anomaly_map, dim=(1, 2, 3))


class ProtoADNetwork(nn.Module):
    """ProtoAD end to end: images [B, 3, H, W] in [0, 1] -> (anomaly_map [B, 1, H, W], score [B]);
    H x W is the preprocessing's input size (``size`` is H, ``width`` is W)."""

    def __init__(
        self,
        patch_features: PatchFeatures,
        prototypes: np.ndarray | torch.Tensor,
        prep: Preprocessing,
        precision: str = "fp32",
        chunk: int = PROTOTYPE_CHUNK,
        *,
        two_stage: TwoStage | None = None,
    ) -> None:
        """``two_stage``: search ``prototypes`` (the fine level) through a coarse level instead of
        the flat conv over all of them (``search.py``); the flat conv is exact, the default."""
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.precision = precision
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32
        self.normalize = Normalize(*prep.normalisation())
        self.patch_features = patch_features.to(self.compute_dtype)
        protos = torch.as_tensor(np.asarray(prototypes, dtype=np.float32))
        k, c = protos.shape
        self.search = None
        if two_stage is not None:
            self.search = TwoStageSearch(protos, two_stage.parent, two_stage.coarse, top=two_stage.top,
                                         dtype=self.compute_dtype)
        # One buffer per chunk, so every conv's weights are an initializer in the graph (a slice
        # of one large buffer would be a runtime Slice, and TensorRT wants constant conv weights).
        self.chunks = 0 if self.search is not None else math.ceil(k / chunk)
        for i in range(self.chunks):
            part = protos[i * chunk : (i + 1) * chunk]
            self.register_buffer(f"prototype_kernels_{i}", part.reshape(len(part), c, 1, 1).to(self.compute_dtype))
            self.register_buffer(f"prototype_bias_{i}", torch.full((len(part),), -1.0, dtype=self.compute_dtype))
        self.k = k
        self.width, self.size = prep.input_size
        self.tail = ScoreTail(self.size, self.width)

    @property
    def n_prototypes(self) -> int:
        return self.k

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images.float()).to(self.compute_dtype)
        feats = self.patch_features(x)
        unit = l2_normalize(feats.float()).to(self.compute_dtype)
        nearest = self.search(unit) if self.search is not None else None
        for i in range(self.chunks):
            shifted = F.conv2d(unit, getattr(self, f"prototype_kernels_{i}"), getattr(self, f"prototype_bias_{i}"))  # cos - 1
            # torch.max, not torch.amax: the exporter wraps amax of FP16 in Cast(FLOAT) -> ReduceMax
            # -> Cast(FLOAT16), which a strongly typed engine runs in FP32; max exports a plain
            # FP16 ReduceMax (onnx_export.inspect_graph flags the casts).
            best = torch.max(shifted, dim=1, keepdim=True).values
            nearest = best if nearest is None else torch.maximum(nearest, best)
        nearest = nearest.float()
        return self.tail(-nearest)  # patch scores: 1 - max cos


def patch_grid(crop: int, stride: int = 4) -> int:
    """Side of the stage-1 feature grid for a square crop."""
    return math.ceil(crop / stride)


def patch_grid_hw(prep: Preprocessing, stride: int = 4) -> tuple[int, int]:
    """(rows, columns) of the stage-1 feature grid for the preprocessing's input size."""
    width, height = prep.input_size
    return patch_grid(height, stride), patch_grid(width, stride)
