"""PyTorch backend: the network rebuilt from the bundle (backbone weights checked by sha256).

The FP32 module is the reference every other backend is compared with (``bench``, ``verify``'s
golden outputs). Needs torch and the backbone's weights on the machine; the other backends do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import load_array
from ..errors import InputError, MissingDependencyError
from .base import Runtime


def build_torch_network(bundle_dir: str | Path, manifest: dict, precision: str = "fp32"):
    """Rebuild the bundle's graph as a module: the ProtoAD network, behind the frame input for a
    ``frames`` bundle (the same modules the ONNX files were traced from)."""
    from ..contract import InputContract
    from ..data.images import Preprocessing
    from ..model.backbones import load_backbone
    from ..options import RANDOM_WEIGHTS
    from ..model.features import PatchFeatures
    from ..model.frames import FrameInput, FrameNetwork
    from ..model.network import ProtoADNetwork, patch_grid_hw

    info = manifest["backbone"]
    weights = info["weights"]
    if weights != RANDOM_WEIGHTS and not Path(weights).is_file():
        raise MissingDependencyError(f"the torch backend needs the backbone weights {weights}, which are not on this machine")
    backbone = load_backbone(info["name"], weights, info.get("architecture"))
    if backbone.weights_sha256 != info["weights_sha256"]:
        raise InputError(f"backbone weights {weights} differ from those the bundle was built with (sha256)")
    prep = Preprocessing.from_manifest(manifest)
    protos = load_array(bundle_dir, manifest, manifest["prototypes"]["file"])
    grid = patch_grid_hw(prep, backbone.spec.strides[0])
    chunk = manifest["prototypes"]["chunk"]
    network = ProtoADNetwork(PatchFeatures(backbone.module, manifest["align"], grid), protos, prep, precision, chunk=chunk)
    contract = InputContract.from_manifest(manifest)
    if contract.kind == "frames":
        network = FrameNetwork(FrameInput(prep, contract.width, contract.height, contract.channel_order), network)
    return network.eval()


class TorchRuntime(Runtime):
    """The PyTorch module: FP32 reference (CPU or CUDA), FP16 on CUDA, optionally ``torch.compile``d.

    ``compile=True`` uses ``mode="reduce-overhead"``, which replays CUDA graphs (CUDA only).
    On CUDA the runtime also offers the timed steps of the bench (set_batch, upload, execute,
    download) on the current stream.
    """

    backend = "torch"

    def __init__(self, bundle_dir: str | Path, manifest: dict, *, precision: str = "fp32", device: str = "cpu",
                 compile: bool = False) -> None:
        import torch

        super().__init__(manifest)
        if precision not in ("fp32", "fp16"):
            raise InputError(f"unknown precision {precision!r}: choose fp32 or fp16")
        if device not in ("cpu", "cuda"):
            raise InputError(f"unknown device {device!r}: choose cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError("device cuda was asked for, but no CUDA GPU is visible")
        if precision == "fp16" and device != "cuda":
            raise InputError("the torch FP16 backend runs on CUDA only (CPU FP16 convolutions are emulated and slow)")
        if compile and device != "cuda":
            raise InputError("torch.compile with CUDA graphs runs on CUDA only")
        self.torch = torch
        self.precision = precision
        self.compiled = compile
        self.device = torch.device(device)
        self.on_gpu = device == "cuda"
        self.network = build_torch_network(bundle_dir, manifest, precision).to(self.device)
        if compile:
            self.network = torch.compile(self.network, mode="reduce-overhead", dynamic=False)
        self._batch = None

    def _run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.torch.from_numpy(inputs).to(self.device)
        with self.torch.no_grad():
            maps, scores = self.network(x)
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()

    # Timed steps (CUDA only), mirroring TensorRTRuntime's.

    @property
    def stream(self):
        return self.torch.cuda.current_stream()

    def set_batch(self, batch: int) -> None:
        """Allocate pinned host and device buffers for ``batch`` inputs."""
        if batch == self._batch:
            return
        t = self.torch
        in_dtype = t.uint8 if self.contract.kind == "frames" else t.float32
        from ..contract import output_shapes

        shape = self.contract.shape(batch)
        self._host_in = t.empty(shape, dtype=in_dtype).pin_memory()
        self._dev_in = t.empty(shape, dtype=in_dtype, device=self.device)
        self._host_maps = t.empty(output_shapes(self.contract, batch)["anomaly_map"], dtype=t.float32).pin_memory()
        self._host_scores = t.empty((batch,), dtype=t.float32).pin_memory()
        self._batch = batch

    def upload(self, inputs: np.ndarray) -> None:
        self._host_in.copy_(self.torch.from_numpy(inputs))
        self._dev_in.copy_(self._host_in, non_blocking=True)

    def execute(self) -> None:
        with self.torch.no_grad():
            self._out = self.network(self._dev_in)

    def download(self) -> None:
        maps, scores = self._out
        self._host_maps.copy_(maps.float(), non_blocking=True)
        self._host_scores.copy_(scores.float(), non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()
