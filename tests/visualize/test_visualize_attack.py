"""Feature attacks on the planted backbone: correctness of alpha, the constraint set, optimisation
quality against an independent first-order bound and plain PGD, determinism, batching, frames,
cancellation and the errors a client sees."""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spurguard.server.backends import TorchBackend
from spurguard.server.engine import ClassComponents
from spurguard.server.engine.decompose import class_projection
from spurguard.server.errors import Cancelled, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted
from spurguard.server.visualize import (
    AttackFrame,
    AttackResult,
    apgd_checkpoints,
    default_eps,
    feature_attack,
)
from spurguard.server.visualize.attack import (
    LOW_FREQUENCY_FACTOR,
    START_NOISE,
    BallBoxProjection,
    jitter_pixels,
)
from spurguard.vocab import ATTACK_PARAMETERIZATIONS
from visualize_support import (
    BLUE_COMPONENT,
    GREEN_COMPONENT,
    MEAN,
    MIXED_COMPONENT,
    PLANTED_CLASS,
    RED_COMPONENT,
    SIZE,
    STD,
    TENT_COMPONENT,
    TENT_PEAK_ALPHA,
    make_backend,
)

ALL = [RED_COMPONENT, GREEN_COMPONENT, BLUE_COMPONENT, MIXED_COMPONENT, TENT_COMPONENT]
CONVEX = [RED_COMPONENT, GREEN_COMPONENT]  # alpha = positive weight * mean(ReLU(linear)) - const
BOX_BINDING_EPS = 24.0  # > the ~19.6 at which the red direction's pixels hit 1: the box matters


def run(backend: TorchBackend, components: ClassComponents, indices: list[int], **kwargs) -> AttackResult:
    kwargs.setdefault("frame_every", 0)
    *_, result = feature_attack(backend, components, indices, **kwargs)
    assert isinstance(result, AttackResult)
    return result


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def alphas64(backend: TorchBackend, components: ClassComponents, indices: list[int], pixels: torch.Tensor) -> np.ndarray:
    """alpha of row i for component indices[i], from float32 features projected in float64."""
    features = backend.features(normalize(pixels)).double()
    projection = class_projection(components, backend.head()[0][PLANTED_CLASS], rows=indices, dtype=torch.float64)
    return projection.alphas(features).diagonal().numpy()


def gray(rows: int) -> torch.Tensor:
    return torch.full((rows, 3, SIZE, SIZE), 0.5)


def gray_gradients(backend: TorchBackend, components: ClassComponents, indices: list[int]) -> torch.Tensor:
    """d alpha / d pixels at gray, computed here independently of the attack."""
    x = gray(len(indices)).requires_grad_()
    projection = class_projection(components, backend.head()[0][PLANTED_CLASS], rows=indices)
    alpha = (backend.features_with_grad(normalize(x)) * projection.directions).sum(1) - projection.offsets
    (grad,) = torch.autograd.grad(alpha.sum(), x)
    return grad


def fixed_step_pgd(
    backend: TorchBackend, components: ClassComponents, indices: list[int], eps: float, steps: int, step: float
) -> np.ndarray:
    """Best alpha of plain PGD: fixed normalised-gradient steps, projected the common way (ball,
    then box), with the same number of gradient evaluations as the attack (steps + 1)."""
    projection = class_projection(components, backend.head()[0][PLANTED_CLASS], rows=indices)
    x0 = gray(len(indices))
    x, best = x0.clone(), torch.full((len(indices),), -math.inf)
    for _ in range(steps + 1):
        x.requires_grad_()
        alpha = (backend.features_with_grad(normalize(x)) * projection.directions).sum(1) - projection.offsets
        (grad,) = torch.autograd.grad(alpha.sum(), x)
        best = torch.maximum(best, alpha.detach())
        with torch.no_grad():
            delta = x + step * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) - x0
            delta *= (eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
            x = (x0 + delta).clamp(0.0, 1.0)
    return best.numpy()


def test_paper_defaults_scale_with_the_input_side() -> None:
    assert default_eps(224) == pytest.approx(30.0)
    assert default_eps(112) == pytest.approx(15.0)
    # Croce & Hein: p = 0.22, then p_j + max(p_j - p_{j-1} - 0.03, 0.06), times 100 steps.
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_start_alpha_is_the_float64_projection_of_gray_features(backend: TorchBackend, components: ClassComponents) -> None:
    result = run(backend, components, ALL, steps=1)
    np.testing.assert_allclose(result.start_alphas, alphas64(backend, components, ALL, gray(len(ALL))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameterization", ATTACK_PARAMETERIZATIONS)
def test_final_alpha_and_prob_belong_to_the_returned_image(
    backend: TorchBackend, components: ClassComponents, parameterization: str
) -> None:
    """Also under jitter, whose ascent sees rolled images: what is reported is the image's own."""
    result = run(backend, components, ALL, parameterization=parameterization)
    assert result.parameterization == parameterization
    np.testing.assert_allclose(
        result.final_alphas, alphas64(backend, components, ALL, result.pixels), rtol=1e-5, atol=1e-6
    )
    logits = backend.logits(backend.features(normalize(result.pixels)))
    probs = torch.softmax(logits.double(), dim=1)[:, PLANTED_CLASS].numpy()
    np.testing.assert_allclose(result.final_probs, probs, rtol=1e-5)
    assert result.final_probs[0] > result.final_probs[1]  # the red feature pushes the planted class most


def test_attack_beats_the_first_order_gain(backend: TorchBackend, components: ClassComponents) -> None:
    """For a convex alpha, f(x0 + eps g/|g|) >= f(x0) + eps |g|: any working ascent reaches that
    gain when the linear step stays in the box. It is large: about 25x the red start alpha."""
    eps = default_eps(SIZE)
    grad = gray_gradients(backend, components, CONVEX)
    norms = grad.flatten(1).norm(dim=1)
    assert float((eps * grad.abs().flatten(1).amax(dim=1) / norms).max()) < 0.5  # the linear step is feasible
    result = run(backend, components, CONVEX)
    gain = eps * norms.numpy()
    assert np.all(result.final_alphas >= result.start_alphas + 0.999 * gain)
    assert result.final_alphas[0] - result.start_alphas[0] > 10 * abs(result.start_alphas[0])


@pytest.mark.parametrize("parameterization", ATTACK_PARAMETERIZATIONS)
@pytest.mark.parametrize("eps", [None, BOX_BINDING_EPS])
def test_images_stay_in_the_ball_and_the_box(
    backend: TorchBackend, components: ClassComponents, eps: float | None, parameterization: str
) -> None:
    result = run(backend, components, ALL, eps=eps, parameterization=parameterization)
    radius = default_eps(SIZE) if eps is None else eps
    assert result.eps == pytest.approx(radius)
    distances = (result.pixels - 0.5).flatten(1).norm(dim=1)
    assert float(distances.max()) <= radius * (1 + 1e-5)
    assert float(result.pixels.min()) >= 0.0 and float(result.pixels.max()) <= 1.0
    expected_uint8 = (result.pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(result.images, expected_uint8)
    if eps == BOX_BINDING_EPS and parameterization == "pixel":  # the budget is used up to the ball even where the box cuts
        assert float(distances[0]) == pytest.approx(radius, rel=1e-4)
        assert float((result.pixels[0, 0] == 1.0).float().mean()) > 0.5  # red saturated


@pytest.mark.parametrize(
    ("indices", "eps", "steps"),
    [(CONVEX, None, 20), (CONVEX, BOX_BINDING_EPS, 20), ([TENT_COMPONENT], None, 50), ([TENT_COMPONENT], None, 200)],
)
def test_apgd_matches_or_beats_fixed_step_pgd(
    backend: TorchBackend, components: ClassComponents, indices: list[int], eps: float | None, steps: int
) -> None:
    """At equal gradient evaluations, against PGD at several fixed step sizes (the usual
    2.5 eps / steps among them): on convex components, with and without the box binding, and
    on the tent, where fixed steps oscillate around the peak (with 20 steps APGD has not yet
    halved its step often enough there, so the tent starts at 50)."""
    radius = eps or default_eps(SIZE)
    apgd = run(backend, components, indices, eps=radius, steps=steps).final_alphas
    for step in (2.5 * radius / steps, radius / 10, radius / 2, radius):
        pgd = fixed_step_pgd(backend, components, indices, radius, steps, step)
        assert np.all(apgd >= pgd - 1e-6), (step, apgd, pgd)


def test_attack_stops_at_an_interior_optimum(backend: TorchBackend, components: ClassComponents) -> None:
    """The tent's alpha peaks with every red value at 0.6, inside the ball: reaching it takes
    the step-size halving, and keeping it the best-so-far tracking."""
    result = run(backend, components, [TENT_COMPONENT])
    assert TENT_PEAK_ALPHA * (1 - 1e-3) <= result.final_alphas[0] <= TENT_PEAK_ALPHA + 1e-6
    assert float((result.pixels[0, 0] - 0.6).abs().mean()) < 1e-3
    assert float((result.pixels[0] - 0.5).norm()) < 0.8 * default_eps(SIZE)


def test_projection_is_euclidean_onto_ball_and_box() -> None:
    generator = torch.Generator().manual_seed(3)
    eps = 4.0
    # Row 0: 48 coordinates at +-3 (clamped to +-0.5 already at the ball's scale eps/|delta|
    # ~ 0.19) and 144 small ones: the ball's scale alone would leave |x| ~ 3.5 < eps; the
    # projection scales the small ones up by ~4.4 instead. Row 1: inside ball and box:
    # unchanged. Row 2: zero stays zero.
    signs = torch.randn(192, generator=generator).sign()
    magnitudes = torch.cat([torch.full((48,), 3.0), 0.1 + 0.2 * torch.rand(144, generator=generator)])
    inside = 0.01 * torch.randn(3, 8, 8, generator=generator)
    delta = torch.stack([(signs * magnitudes).view(3, 8, 8), inside, torch.zeros(3, 8, 8)])
    projected = BallBoxProjection(delta, eps)(delta.clone())
    # Reference: projection = clamp(s delta), largest s <= 1 with |clamp(s delta)| <= eps (bisection).
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(delta[0].mul(mid).clamp(-0.5, 0.5).norm()) <= eps else (lo, mid)
    torch.testing.assert_close(projected[0], delta[0].mul(lo).clamp(-0.5, 0.5), rtol=1e-5, atol=1e-6)
    assert float(projected[0].norm()) == pytest.approx(eps, rel=1e-5)
    assert float(delta[0].mul(eps / delta[0].norm()).clamp(-0.5, 0.5).norm()) < 0.9 * eps  # the shortcut
    torch.testing.assert_close(projected[1], delta[1])
    assert torch.equal(projected[2], torch.zeros(3, 8, 8))


def test_same_seed_same_images(backend: TorchBackend, components: ClassComponents) -> None:
    first, second = run(backend, components, ALL, seed=5), run(backend, components, ALL, seed=5)
    assert torch.equal(first.pixels, second.pixels)
    np.testing.assert_array_equal(first.final_alphas, second.final_alphas)


def test_a_component_dead_on_gray_escapes_with_a_seeded_direction(
    backend: TorchBackend, components: ClassComponents
) -> None:
    assert float(gray_gradients(backend, components, [BLUE_COMPONENT]).abs().max()) == 0.0
    seed0, seed1 = (run(backend, components, [BLUE_COMPONENT], seed=s) for s in (0, 1))
    assert seed0.final_alphas[0] > seed0.start_alphas[0] + 0.05
    assert not torch.equal(seed0.pixels, seed1.pixels)
    assert torch.equal(seed0.pixels, run(backend, components, [BLUE_COMPONENT], seed=0).pixels)


class _ZeroAtGray(torch.nn.Module):
    """Feature 0 = mean ReLU(R - 0.5): its pre-activation is exactly 0 on gray, so its gradient
    there is exactly 0 (ReLU'(0) = 0), yet any red above gray raises it. The others are 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] * STD[0] + MEAN[0] - 0.5  # x is normalised; MEAN[0] = 0.5 makes gray exactly 0
        phi = torch.relu(red).mean(dim=(1, 2))
        return torch.stack([phi, *[torch.zeros_like(phi)] * 6], dim=1)


def test_a_component_exactly_at_zero_on_gray_climbs_its_own_gradient(components: ClassComponents) -> None:
    """The start is gray plus seeded noise (START_NOISE), so the first step already follows the
    component's gradient: red rises, green and blue keep only the start noise (a random first
    direction, the fallback for components dead by a margin, would move them as much as red)."""
    backend = make_backend(_ZeroAtGray())
    assert float(gray_gradients(backend, components, [RED_COMPONENT]).abs().max()) == 0.0
    result = run(backend, components, [RED_COMPONENT], steps=1)
    moved = (result.pixels[0] - 0.5).abs()
    assert float(moved[0].max()) > 0.05
    assert float(moved[1:].max()) <= 6 * START_NOISE
    assert result.final_alphas[0] > result.start_alphas[0] + 0.01


def test_low_frequency_images_are_a_coarse_grid_upsampled(backend: TorchBackend, components: ClassComponents) -> None:
    """x - gray lies in the span of the bilinear upsampling of a 4x coarser grid (least squares
    residual ~0); the pixel attack's does not (its border pixels differ: residual ~0.1)."""
    coarse = SIZE // LOW_FREQUENCY_FACTOR
    basis = torch.eye(coarse * coarse, dtype=torch.float64).view(-1, 1, coarse, coarse)
    upsampling = torch.nn.functional.interpolate(basis, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    upsampling = upsampling.view(coarse * coarse, SIZE * SIZE).T  # [S², s²]

    def residual(result: AttackResult) -> float:
        delta = (result.pixels.double() - 0.5).reshape(-1, SIZE * SIZE).T  # one column per image and channel
        fit = torch.linalg.lstsq(upsampling, delta).solution
        return float((upsampling @ fit - delta).norm() / delta.norm())

    smooth = run(backend, components, CONVEX, parameterization="low_frequency")
    assert np.all(smooth.final_alphas > smooth.start_alphas)
    assert residual(smooth) < 1e-5
    assert residual(run(backend, components, CONVEX)) > 0.05


class _CornerDetector(torch.nn.Module):
    """Feature 0 = the red of pixel (0, 0) above 0.49: one pixel decides it, so an attack that
    sees the image unrolled changes only that pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0, 0, 0] * STD[0] + MEAN[0]
        phi = torch.relu(red - 0.49)
        return torch.stack([phi, *[torch.zeros_like(phi)] * 6], dim=1)


def test_jitter_takes_each_gradient_on_a_seeded_roll_of_the_image(components: ClassComponents) -> None:
    """Under jitter pixel (0, 0) of what the model sees is a different image pixel each step,
    all within jitter_pixels(side) of the corner (wrapping around the edges); the same seed
    gives the same rolls."""
    backend = make_backend(_CornerDetector())
    reach = jitter_pixels(SIZE)

    def changed(result: AttackResult) -> set[tuple[int, int]]:
        rows, cols = np.nonzero((result.pixels[0, 0] - 0.5).abs().numpy() > 0.01)
        return set(zip(rows.tolist(), cols.tolist()))

    assert changed(run(backend, components, [RED_COMPONENT], steps=20)) == {(0, 0)}
    jittered = run(backend, components, [RED_COMPONENT], steps=20, parameterization="jitter", seed=3)
    spots = changed(jittered)
    assert len(spots) >= 3
    assert all(min(r, SIZE - r) <= reach and min(c, SIZE - c) <= reach for r, c in spots)
    again = run(backend, components, [RED_COMPONENT], steps=20, parameterization="jitter", seed=3)
    assert torch.equal(jittered.pixels, again.pixels)


def test_a_batch_equals_separate_runs(backend: TorchBackend, components: ClassComponents) -> None:
    """Rows never interact; batched kernels may round differently, hence the tolerance."""
    batch = run(backend, components, ALL)
    assert batch.components == tuple(ALL) and batch.class_index == PLANTED_CLASS
    for row, index in enumerate(ALL):
        single = run(backend, components, [index])
        torch.testing.assert_close(batch.pixels[row], single.pixels[0], rtol=0, atol=1e-3)
        np.testing.assert_allclose(batch.final_alphas[row], single.final_alphas[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.start_alphas[row], single.start_alphas[0], rtol=1e-6, atol=1e-7)


def test_frames_every_n_steps_then_the_result(backend: TorchBackend, components: ClassComponents) -> None:
    items = list(feature_attack(backend, components, CONVEX, steps=20, frame_every=5))
    frames, result = items[:-1], items[-1]
    assert all(isinstance(f, AttackFrame) for f in frames) and isinstance(result, AttackResult)
    assert [f.step for f in frames] == [0, 5, 10, 15, 20]
    for frame in frames:
        assert frame.images.shape == (2, SIZE, SIZE, 3) and frame.images.dtype == np.uint8
        assert frame.alphas.shape == frame.probs.shape == (2,)
        assert np.all(frame.alphas <= result.final_alphas + 1e-6)  # the result is the best seen
    assert np.all(frames[0].images == 128)  # gray 0.5 rounds to 128
    np.testing.assert_array_equal(frames[0].alphas, result.start_alphas)
    assert frames[-1].alphas[0] > frames[0].alphas[0]


def test_cancel_stops_at_the_next_step(backend: TorchBackend, components: ClassComponents) -> None:
    cancel = threading.Event()
    attack = feature_attack(backend, components, ALL, steps=200, frame_every=1, cancel=cancel)
    steps_seen = []
    with pytest.raises(Cancelled, match="after 3 of 200 steps"):
        for frame in attack:
            steps_seen.append(frame.step)
            if frame.step == 3:
                cancel.set()
    assert steps_seen == [0, 1, 2, 3]


def test_a_backend_without_gradients_is_a_failed_precondition(components: ClassComponents) -> None:
    remote = SimpleNamespace(name="remote", kind="triton", input_size=SIZE)
    with pytest.raises(FailedPrecondition, match="local torch backend with gradients; model remote runs on triton"):
        feature_attack(remote, components, [RED_COMPONENT])  # raised at the call, before any frame


def test_running_out_of_device_memory_is_resource_exhausted(
    backend: TorchBackend, components: ClassComponents, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backend, "features_with_grad", out_of_memory)
    with pytest.raises(ResourceExhausted, match="gradients for 5 images at once do not fit on cpu"):
        run(backend, components, ALL)


def test_bad_arguments_are_rejected_at_the_call(backend: TorchBackend, components: ClassComponents) -> None:
    with pytest.raises(InvalidInput, match="unknown attack parameterization 'fourier'; use one of pixel"):
        feature_attack(backend, components, [0], parameterization="fourier")
    with pytest.raises(NotFound, match="no component 5"):
        feature_attack(backend, components, [0, 5])
    with pytest.raises(InvalidInput, match="no components"):
        feature_attack(backend, components, [])
    with pytest.raises(InvalidInput, match="eps"):
        feature_attack(backend, components, [0], eps=0.0)
    with pytest.raises(InvalidInput, match="steps"):
        feature_attack(backend, components, [0], steps=0)
    with pytest.raises(InvalidInput, match="frame_every"):
        feature_attack(backend, components, [0], frame_every=-1)


def test_torchscript_backbone_gives_the_same_attack(
    backend: TorchBackend, traced_backend: TorchBackend, components: ClassComponents
) -> None:
    eager, traced = run(backend, components, CONVEX, steps=30), run(traced_backend, components, CONVEX, steps=30)
    torch.testing.assert_close(eager.pixels, traced.pixels, rtol=0, atol=1e-5)
    np.testing.assert_allclose(eager.final_alphas, traced.final_alphas, rtol=1e-5)
