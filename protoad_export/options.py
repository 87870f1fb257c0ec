"""Every user-facing option's choices and defaults, declared once.

Torch-free: the CLI builds its choice lists and defaults from here, the library's config classes
validate against the same names, and a line PC's runtime imports it without PyTorch.
"""

from __future__ import annotations

AUTO = "auto"  # an option the build decides from the training images (and records why)

# Build: images -> features
BACKBONES = ("wide_resnet50_2", "resnet18", "efficientnet_lite0")
DEFAULT_BACKBONE = "wide_resnet50_2"
RANDOM_WEIGHTS = "random"
ALIGN_MODES = ("bilinear", "nearest")  # paper: bilinear; authors' code: nearest
RESIZE_MODES = ("crop", "squash", "letterbox")  # what a bundle records
RESIZE_CHOICES = (AUTO, *RESIZE_MODES)  # auto: data/geometry.py
DEFAULT_RESIZE_MODE = AUTO
DEFAULT_RESIZE, DEFAULT_CROP = 256, 224
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_HOLDOUT = 0.1

# Build: features -> prototypes
PAPER_MAX_PROTOTYPES = 10_000  # the paper's rule: the first FINCH partition below this
# "auto": the coarsest FINCH level whose held-out quantisation error stays within AUTO_MARGIN of the
# finest level's, among levels of at most AUTO_PROTOTYPE_CAP prototypes; where none is, the partition of
# AUTO_PROTOTYPE_CAP clusters just finer (clustering/levels.py).
DEFAULT_MAX_PROTOTYPES: int | str = AUTO  # benchmarks/RESULTS.md sections 6, 7 and 13
AUTO_MARGIN = 0.05  # set on the magnetic tiles (benchmarks/RESULTS.md sections 7 and 13)
AUTO_PROTOTYPE_CAP = 200_000
NEIGHBOUR_METHODS = ("auto", "exact", "approx")

# Build: network -> ONNX
INPUT_KINDS = ("frames", "tensor")
INPUT_CHOICES = (AUTO, *INPUT_KINDS)  # auto: frames when the training images share one size, else tensor
DEFAULT_INPUT = AUTO
CHANNEL_ORDERS = ("rgb", "bgr", "gray")
# Prototypes per 1x1 conv of the graph: a chunk's similarities (1024 x 56 x 56, 12.8 MB per image in
# FP32) stay in cache between the conv and its max, and no [B, K, h, w] tensor of all K prototypes is
# held (benchmarks/RESULTS.md section 9). Max is an ElementWise layer in TensorRT's ONNX parser.
PROTOTYPE_CHUNK = 1024
DEFAULT_BATCH_PROFILE = (1, 8, 32)  # TensorRT optimisation profile MIN:OPT:MAX

# Runtime and evaluation
RUNTIME_BACKENDS = ("onnxruntime", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16")
BASELINES = ("knn",)  # eval's reference methods beside ProtoAD
# bench/verify backend name -> (runtime backend, precision, torch.compile)
BACKEND_SPECS: dict[str, tuple[str, str, bool]] = {
    "torch": ("torch", "fp32", False),
    "torch-fp16": ("torch", "fp16", False),
    "torch-fp16-compile": ("torch", "fp16", True),
    "onnxruntime": ("onnxruntime", "fp32", False),
    "onnxruntime-fp16": ("onnxruntime", "fp16", False),
    "tensorrt": ("tensorrt", "fp16", False),
}
# (atol, rtol) per precision for bench and verify: |out - ref| <= atol + rtol * |ref|. FP32 backends
# differ from the reference by summation order only; FP16 ones by rounding of activations and
# weights (the prototype conv is designed to keep ~1e-3 on 1 - cos, see network.py).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 5e-2)}
# The network's largest intermediate is one conv chunk's similarities, batch x chunk x h x w FP32;
# batches are cut to keep it under this.
SIMILARITY_BUDGET_BYTES = 2 << 30


def similarity_batch(prototypes: int, grid, batch_size: int, chunk: int | None = None) -> int:
    """``batch_size``, cut so one batch's similarity tensor (``chunk`` prototypes per conv,
    ``PROTOTYPE_CHUNK`` by default) on a ``grid`` (h, w) fits ``SIMILARITY_BUDGET_BYTES``."""
    per_image = min(int(prototypes), chunk or PROTOTYPE_CHUNK) * int(grid[0]) * int(grid[1]) * 4
    return max(1, min(batch_size, SIMILARITY_BUDGET_BYTES // per_image))
