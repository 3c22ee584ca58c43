"""Heatmaps on the planted backbone: they must point at the red square for the red component
and away from it for a distractor; each method equals its float64 reference; hooks never
outlive Grad-CAM; backbones that cannot be hooked fall back to integrated gradients with the
same numbers; overlays are well-formed PNGs."""
from __future__ import annotations

import copy
import dataclasses
import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from spurguard.server.backends import TorchBackend, denormalize
from spurguard.server.engine import ClassComponents
from spurguard.server.engine.decompose import class_projection
from spurguard.server.errors import FailedPrecondition, InvalidInput, ResourceExhausted
from spurguard.server.visualize import capture_layer, component_heatmaps, overlay, overlay_pngs
from spurguard.server.visualize._objective import ComponentObjective
from spurguard.server.visualize.heatmap import INTEGRATED_GRADIENTS_STEPS, display_scale, integrated_gradients
from spurguard.vocab.display import HEATMAP_COLORMAP, heatmap_css_gradient
from visualize_support import (
    GREEN_COMPONENT,
    MEAN,
    PLANTED_CLASS,
    RED_COMPONENT,
    SIZE,
    STD,
    TENT_COMPONENT,
    PlantedCNN,
    make_backend,
    probe_image,
    square_mask,
)

# The square is 6.25% of the image, so a heatmap blind to it puts ~6% of its mass there. 0.6
# (10x chance) still leaves room for the unavoidable spill: saliency reaches one pixel past the
# square (the 3x3 receptive field, ~17% of the mass here) and Grad-CAM on the 16x16 map spreads
# half a cell when upsampled (~10%).
MIN_MASS_IN_SQUARE = 0.6
MAX_MASS_IN_SQUARE_OFF_TARGET = 0.2  # the green distractor lives on the background


def mass_in_square(heatmap: np.ndarray) -> float:
    return float(heatmap[square_mask()].sum() / heatmap.sum())


@pytest.fixture(scope="module")
def probes(backend: TorchBackend) -> torch.Tensor:
    return backend.preprocess([probe_image(seed) for seed in range(3)])


def hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


METHODS = [("input_gradient", None), ("integrated_gradients", None), ("grad_cam", "down"), ("grad_cam", "act")]


@pytest.mark.parametrize(("method", "layer"), METHODS)
def test_red_heatmaps_point_at_the_red_square(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor, method: str, layer: str | None
) -> None:
    heatmaps = component_heatmaps(backend, components, RED_COMPONENT, probes, method=method, layer=layer)
    assert (heatmaps.method, heatmaps.layer) == (method, layer)
    assert heatmaps.maps.shape == (3, SIZE, SIZE) and heatmaps.maps.dtype == np.float32
    assert np.allclose(heatmaps.maps.max(axis=(1, 2)), 1.0) and heatmaps.maps.min() >= 0.0
    for heatmap in heatmaps.maps:
        assert mass_in_square(heatmap) >= MIN_MASS_IN_SQUARE


@pytest.mark.parametrize(("method", "layer"), METHODS[:3])
def test_a_distractor_heatmap_looks_elsewhere(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor, method: str, layer: str | None
) -> None:
    heatmaps = component_heatmaps(backend, components, GREEN_COMPONENT, probes, method=method, layer=layer)
    for heatmap in heatmaps.maps:
        assert mass_in_square(heatmap) <= MAX_MASS_IN_SQUARE_OFF_TARGET


def test_saliency_is_the_blurred_pixel_gradient(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    """Reference: |d alpha / d pixels| ([0, 1] units, not normalised ones) summed over colours,
    scipy's Gaussian (2 px at 224², edges replicated), divided by its maximum. The component
    mixes the red window detector with the red-level ramp, so the colour channels' gradients
    differ in shape and the units matter."""
    mixed = np.zeros((1, components.vectors.shape[1]))
    mixed[0, [0, 5]] = 1.0 / np.sqrt(2.0)
    probe_components = dataclasses.replace(components, vectors=mixed, eigenvalues=np.ones(1))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (probes * std + mean).requires_grad_()
    projection = class_projection(probe_components, backend.head()[0][PLANTED_CLASS])
    (grad,) = torch.autograd.grad(projection.alphas(backend.features_with_grad((pixels - mean) / std)).sum(), pixels)
    heatmaps = component_heatmaps(backend, probe_components, 0, probes, method="input_gradient")
    for heatmap, saliency in zip(heatmaps.maps, grad.abs().sum(dim=1).double().numpy()):
        expected = ndimage.gaussian_filter(saliency, sigma=2.0 * SIZE / 224, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(heatmap, expected / expected.max(), rtol=1e-4, atol=1e-6)


def reference_integrated_gradients(
    backend: TorchBackend, components: ClassComponents, index: int, pixels: np.ndarray, steps: int
) -> np.ndarray:
    """Attributions [N,3,S,S] in float64 and [0, 1] pixel units: (p - 0.5) times the mean
    gradient of alpha over the midpoints of `steps` segments of the path from gray to p."""
    module = copy.deepcopy(backend.module).double()
    weight = backend.head()[0][PLANTED_CLASS].double()
    vector = torch.from_numpy(components.vectors[index])
    mean, std = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1), torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    p = torch.from_numpy(pixels)
    total = torch.zeros_like(p)
    for step in range(steps):
        point = (0.5 + (p - 0.5) * (step + 0.5) / steps).requires_grad_()
        a = weight * module((point - mean) / std)
        alpha = ((a - torch.from_numpy(components.mean)) @ vector) * vector.sum()
        (grad,) = torch.autograd.grad(alpha.sum(), point)
        total += grad
    return ((p - 0.5) * total / steps).numpy()


def test_integrated_gradients_equal_the_float64_reference(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (probes * std + mean).double().numpy()
    attributions = reference_integrated_gradients(backend, components, RED_COMPONENT, pixels, INTEGRATED_GRADIENTS_STEPS)
    expected = attributions.sum(axis=1).clip(min=0.0)
    heatmaps = component_heatmaps(backend, components, RED_COMPONENT, probes, method="integrated_gradients")
    np.testing.assert_allclose(heatmaps.maps, expected / expected.max(axis=(1, 2), keepdims=True), rtol=1e-4, atol=1e-5)


def test_integrated_gradients_add_up_to_the_rise_of_alpha_above_gray(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    """Completeness: with enough steps the attributions sum to alpha(x) - alpha(gray). The
    planted detectors switch on along the path (ReLU kinks), so the midpoint rule converges
    slowly: 16 steps give 20% of the sum here, 1024 all of it."""
    objective = ComponentObjective(backend, components, [RED_COMPONENT] * len(probes), "test")
    attributions, alpha = integrated_gradients(objective, probes, slice(None), steps=1024)
    gray = torch.full((1, 3, SIZE, SIZE), 0.5)
    gray_alpha = objective.alphas(backend.features((gray - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)))
    rise = (alpha - gray_alpha).numpy()
    assert (np.abs(rise) > 0.01).all()  # not a trivial 0 = 0
    np.testing.assert_allclose(attributions.sum(dim=(1, 2, 3)).numpy(), rise, rtol=1e-2)


def test_gradcam_on_the_last_map_is_relu_of_the_weighted_channels(
    backend: TorchBackend, components: ClassComponents
) -> None:
    """alpha = <directions, mean(act)> - offset, so its gradient on `act` is uniform per
    channel: Grad-CAM there is ReLU(sum_c directions_c act_c), scaled to a maximum of 1. The
    tent's directions have mixed signs and its probe has red levels on both sides of the peak
    (0.7: positive evidence, 0.95: negative), so the ReLU matters."""
    image = probe_image(0)
    image[20:28, 20:28] = (178, 128, 128)  # red level 0.7
    inputs = backend.preprocess([image, image])
    indices = [RED_COMPONENT, TENT_COMPONENT]
    with torch.no_grad():
        act = backend.module.act(backend.module.detect(inputs))
    directions = class_projection(components, backend.head()[0][PLANTED_CLASS], rows=indices).directions
    cam = torch.relu(torch.einsum("nc,nchw->nhw", directions, act)).numpy()
    assert cam[1].max() > 0 and cam[1][square_mask()].max() == 0  # the tent: only the 0.7 region
    heatmaps = component_heatmaps(backend, components, indices, inputs, layer="act")
    np.testing.assert_allclose(heatmaps.maps, cam / cam.max(axis=(1, 2), keepdims=True), rtol=1e-5, atol=1e-6)


def test_alphas_are_the_float64_projection(backend: TorchBackend, components: ClassComponents, probes: torch.Tensor) -> None:
    indices = [RED_COMPONENT, GREEN_COMPONENT, RED_COMPONENT]
    heatmaps = component_heatmaps(backend, components, indices, probes, layer="down")
    projection = class_projection(components, backend.head()[0][PLANTED_CLASS], rows=indices, dtype=torch.float64)
    expected = projection.alphas(backend.features(probes).double()).diagonal().numpy()
    np.testing.assert_allclose(heatmaps.alphas, expected, rtol=1e-5, atol=1e-6)


def test_chunks_give_the_same_maps_as_single_images(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    inputs = torch.cat([probes, probes])  # 6 images: two chunks of max_batch_size = 4
    indices = [RED_COMPONENT, GREEN_COMPONENT] * 3
    for method, layer in METHODS[:3]:
        together = component_heatmaps(backend, components, indices, inputs, method=method, layer=layer)
        for row, index in enumerate(indices):
            alone = component_heatmaps(backend, components, index, inputs[row : row + 1], method=method, layer=layer)
            np.testing.assert_allclose(together.maps[row], alone.maps[0], rtol=1e-5, atol=1e-6)


def test_gradcam_removes_its_hook_even_on_error(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    component_heatmaps(backend, components, RED_COMPONENT, probes, layer="down")
    assert hooks_left(backend.module) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layer(backend.module, "down", "planted"):
            assert hooks_left(backend.module) == 1
            raise RuntimeError("boom")
    assert hooks_left(backend.module) == 0
    with pytest.raises(InvalidInput, match=r"layer 'flatten' gives \[3, 7\]"):  # features, not a map
        component_heatmaps(backend, components, RED_COMPONENT, probes, layer="flatten")
    assert hooks_left(backend.module) == 0


def test_gradcam_ignores_forward_passes_of_other_threads(backend: TorchBackend, probes: torch.Tensor) -> None:
    """A served model runs Score passes on other threads while a heatmap is being made."""
    with capture_layer(backend.module, "down", "planted") as capture:
        other = threading.Thread(target=backend.module, args=(probes,))
        other.start()
        other.join()
        assert capture.outputs == []
        backend.module(probes)
        assert capture.output().shape[0] == probes.shape[0]


def test_an_unknown_layer_lists_the_valid_ones(backend: TorchBackend, components: ClassComponents, probes: torch.Tensor) -> None:
    with pytest.raises(InvalidInput, match=r"no layer 'body'; its layers \(5\): detect, act, down, pool, flatten"):
        component_heatmaps(backend, components, RED_COMPONENT, probes, layer="body")


@pytest.mark.parametrize("kind", ["torchscript", "fx"])
def test_unhookable_backbones_fall_back_to_the_same_integrated_gradients(
    backend: TorchBackend,
    traced_backend: TorchBackend,
    components: ClassComponents,
    probes: torch.Tensor,
    kind: str,
) -> None:
    other = traced_backend if kind == "torchscript" else make_backend(torch.fx.symbolic_trace(PlantedCNN()))
    fallback = component_heatmaps(other, components, RED_COMPONENT, probes, layer="down")
    eager = component_heatmaps(backend, components, RED_COMPONENT, probes, method="integrated_gradients")
    assert fallback.method == "integrated_gradients" and fallback.layer is None
    np.testing.assert_allclose(fallback.maps, eager.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fallback.alphas, eager.alphas, rtol=1e-5, atol=1e-6)


def test_bad_requests(backend: TorchBackend, components: ClassComponents, probes: torch.Tensor) -> None:
    with pytest.raises(InvalidInput, match="2 component indices for 3 images"):
        component_heatmaps(backend, components, [0, 1], probes)
    with pytest.raises(InvalidInput, match="non-empty batch"):
        component_heatmaps(backend, components, 0, probes[:0])
    with pytest.raises(InvalidInput, match="unknown heatmap method 'occlusion'"):
        component_heatmaps(backend, components, 0, probes, method="occlusion")  # type: ignore[arg-type]
    remote = SimpleNamespace(name="remote", kind="triton", max_batch_size=4)
    with pytest.raises(FailedPrecondition, match="heatmaps need a local torch backend"):
        component_heatmaps(remote, components, 0, probes)


def test_running_out_of_device_memory_is_resource_exhausted(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backend, "features_with_grad", out_of_memory)
    for method, layer in METHODS[:3]:
        with pytest.raises(ResourceExhausted, match="gradients for 3 images at once"):
            component_heatmaps(backend, components, RED_COMPONENT, probes, method=method, layer=layer)
    assert hooks_left(backend.module) == 0


def test_overlay_blends_by_heat() -> None:
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    out = overlay(image, heat, opacity=1.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[1:], image[1:])  # no heat: the image shows through
    np.testing.assert_array_equal(out[0, 0], [252, 255, 163])  # full heat, full opacity: the hottest colour
    np.testing.assert_array_equal(overlay(image, heat, opacity=0.0), image)
    with pytest.raises(InvalidInput, match="does not match"):
        overlay(image, np.zeros((3, 4)))


def test_overlay_colours_are_the_shared_colour_scale() -> None:
    """The legend every viewer draws (vocab.display) is the colour the server paints: over a
    black image at full opacity, heat h at each stop of HEATMAP_COLORMAP comes out as h times
    that stop's colour (the blend weight is opacity * heat)."""
    stops = [stop for stop, _ in HEATMAP_COLORMAP]
    heat = np.array([stops], dtype=np.float32)
    out = overlay(np.zeros((1, len(stops), 3), dtype=np.uint8), heat, opacity=1.0)
    expected = np.rint(np.array([[np.multiply(stop, rgb) for stop, rgb in HEATMAP_COLORMAP]]) * 255)
    np.testing.assert_array_equal(out, expected)
    assert heatmap_css_gradient().startswith("linear-gradient(to right, rgb(0, 0, 5) 0%, rgb(87, 15, 110) 25%")


def test_overlay_pngs_decode_to_the_model_input_size(
    backend: TorchBackend, components: ClassComponents, probes: torch.Tensor
) -> None:
    heatmaps = component_heatmaps(backend, components, RED_COMPONENT, probes)
    pngs = overlay_pngs(probes, heatmaps, backend.preprocess_config)
    assert len(pngs) == 3
    decoded = np.asarray(Image.open(io.BytesIO(pngs[0])))
    assert decoded.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(decoded[20:, 20:], probe_image(0)[20:, 20:])  # cold background unchanged
    drawn = overlay(denormalize(probes[0], backend.preprocess_config), display_scale(heatmaps.maps[0]))
    np.testing.assert_array_equal(decoded, drawn)


def test_display_scale_lifts_all_but_the_hottest_pixels() -> None:
    """A spiky map: one pixel at 1, a 6x6 patch at 0.1. Scaled by its maximum the patch would
    be a 10% tint; on display it is the hottest colour, and the cold rest stays cold."""
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[1:7, 1:7] = 0.1
    heat[8, 8] = 1.0
    scaled = display_scale(heat)
    np.testing.assert_allclose(scaled[1:7, 1:7], 1.0)
    assert scaled[8, 8] == 1.0 and scaled[heat == 0].max() == 0.0
    assert not display_scale(np.zeros((3, 3))).any()
