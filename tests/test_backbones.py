"""Backbones: the offline weights are hosted in the architecture they were trained in, and engine
directories built with the earlier host still rebuild their own reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoad_export.model.backbones import efficientnet_lite0_classifier, get_spec, load_backbone
from protoad_export.errors import InputError
from protoad_export.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# ImageNet classes a classifier may fairly give scikit-learn's two bundled photos.
PHOTOS = {"china.jpg": (698, 663, 832), "flower.jpg": (985,)}  # palace, monastery, stupa; daisy


def _correct_mass(architecture: str, mean, std) -> dict[str, tuple[float, bool]]:
    """Probability on the fair classes and whether the top-1 class is one of them, per photo."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    prep = Preprocessing(mode="crop", mean=mean, std=std)  # resize 256, centre crop 224
    model = efficientnet_lite0_classifier(None, architecture)[0].eval()
    out = {}
    for image, name in zip(photos.images, photos.filenames):
        x = torch.from_numpy(prep.image_array(Image.fromarray(image)))[None]
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            p = model(x).softmax(1)[0]
        fair = PHOTOS[name.replace("\\", "/").rsplit("/", 1)[-1]]
        out[name] = (float(p[list(fair)].sum()), int(p.argmax()) in fair)
    return out


def test_offline_weights_classify_photos_in_their_own_host():
    """The weights are TF EfficientNet-Lite0 (TF 'SAME' padding, BN eps 1e-3, inputs in [-1, 1]):
    so hosted they name both photos right; in timm's plain efficientnet_lite0 with ImageNet
    mean/std (the host before 2026-11-27) the flower becomes a lampshade and both lose confidence."""
    spec = get_spec("efficientnet_lite0")
    assert spec.architecture == "tf_efficientnet_lite0" and spec.mean == spec.std == (0.5, 0.5, 0.5)
    own = _correct_mass(spec.architecture, spec.mean, spec.std)
    legacy = _correct_mass("efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD)
    assert all(top1 for _, top1 in own.values()), own
    assert not all(top1 for _, top1 in legacy.values()), legacy
    for name in own:
        assert own[name][0] > legacy[name][0], (name, own[name], legacy[name])


def test_preprocessing_takes_the_backbones_normalisation_unless_given():
    eff, wrn = get_spec("efficientnet_lite0"), get_spec("wide_resnet50_2")
    assert eff.preprocessing(Preprocessing()).mean == (0.5, 0.5, 0.5)
    assert wrn.preprocessing(Preprocessing()).std == IMAGENET_STD
    given = Preprocessing(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert eff.preprocessing(given) == given
    with pytest.raises(ValueError, match="mean/std not set"):
        Preprocessing().normalisation()


def test_legacy_host_for_old_engine_directories():
    old = load_backbone("efficientnet_lite0", None, "efficientnet_lite0")
    new = load_backbone("efficientnet_lite0")
    assert old.spec.architecture == "efficientnet_lite0" and old.spec.mean == IMAGENET_MEAN
    assert old.weights_sha256 == new.weights_sha256  # same weights, different host
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = old.module(x)[0], new.module(x)[0]
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises(InputError, match="cannot be hosted"):
        load_backbone("wide_resnet50_2", "random", "efficientnet_lite0")


def test_runtime_rebuilds_an_old_manifest_with_the_old_host(small_bundle, tmp_path):
    """A manifest written before the architecture was recorded (ImageNet mean/std, plain timm
    host) must rebuild that network, not today's."""
    import json
    import shutil

    from protoad_export.bundle import read_manifest
    from protoad_export.runtime.pytorch import build_torch_network

    old_dir = tmp_path / "old"
    shutil.copytree(small_bundle, old_dir)
    manifest = json.loads((old_dir / "manifest.json").read_text())
    del manifest["backbone"]["architecture"]
    manifest["schema_version"] = 1  # what such a bundle's manifest says
    manifest["preprocessing"]["mean"], manifest["preprocessing"]["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    (old_dir / "manifest.json").write_text(json.dumps(manifest))
    manifest = read_manifest(old_dir)
    net = build_torch_network(old_dir, manifest)
    today = build_torch_network(small_bundle, read_manifest(small_bundle))
    kinds = {type(m).__name__ for m in net.modules()}
    assert "Conv2dSame" not in kinds and "Conv2dSame" in {type(m).__name__ for m in today.modules()}
    np.testing.assert_allclose(net.normalize.mean.flatten().numpy(), IMAGENET_MEAN, rtol=1e-6)
