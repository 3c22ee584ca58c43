"""Feature attack: the image near uniform gray that a component's alpha likes most (SPEC §1 (b)).

Starting from gray (0.5 in [0, 1] pixel space), maximise alpha_l(x) under ||x - x0||_2 <= eps
and x in [0, 1] with APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", Alg. 1): normalised-gradient
steps with momentum 0.75, the step size halved at checkpoints where progress stalled, restarts
from the best point so far. APGD rather than fixed-step PGD because it needs no step-size tuning
across models and input sizes and reaches higher alphas in the same number of steps.

Projections onto the ball ∩ box are Euclidean (see BallBoxProjection), not the common
"scale into the ball, then clip" shortcut, which wastes budget wherever pixels saturate.

The ascent starts from gray plus seeded noise of START_NOISE per pixel (below one grey level, so
the start still shows as gray): on a model whose ReLUs are all dead or exactly at zero on a
uniform image (an adversarially trained one, issue 13), the gradient at exact gray is zero.

Three parameterisations (`parameterization`), measured in bench/run.py attack_readability:
- ``pixel``: every pixel of x - gray is a variable (the paper's attack);
- ``low_frequency``: x - gray is a grid LOW_FREQUENCY_FACTOR times coarser, upsampled
  bilinearly, so the attack can only draw smooth structure (no pixel-level noise). The box holds
  on the grid (bilinear weights are convex) and the ball on the upsampled image;
- ``jitter``: pixels as in ``pixel``, but each step's gradient is taken on the image rolled by
  a seeded random shift of up to jitter_pixels(side) in each direction (transformation
  robustness, Olah et al. 2017, "Feature Visualization"): what survives is evidence the model
  sees wherever it sits, not noise tuned to one pixel grid. The best image is chosen by the
  jittered alpha, and its reported alpha and p(k|x) are those of the image itself.

Every image of the batch follows its own trajectory (own step size, own checkpoint decisions),
so attacking several components together gives the images of attacking them one by one (up
to the rounding of batched kernels, which on a non-convex alpha can tip a trajectory into
another local optimum), for one forward and backward pass per step. The inner loop keeps all
state on the backend's device and never syncs with the host except at frame steps.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spurguard.server.backends.base import Backend
from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import Cancelled, InvalidInput
from spurguard.server.visualize._objective import GRAY, ComponentObjective
from spurguard.vocab import ATTACK_PARAMETERIZATIONS, DEFAULT_ATTACK_PARAMETERIZATION, AttackParameterizationName

PAPER_EPS = 30.0  # L2 radius in [0, 1] pixel units at PAPER_SIZE² (Neuhaus et al. 2023)
PAPER_SIZE = 224
DEFAULT_STEPS = 200
DEFAULT_FRAME_EVERY = 20
BOX_HALF_WIDTH = min(GRAY, 1.0 - GRAY)  # [0, 1] around the gray start: |x - gray| <= 0.5
MOMENTUM = 0.75  # APGD's alpha
RHO = 0.75  # APGD: halve the step when fewer than this share of steps since the last checkpoint improved
MIN_EPS = 1.0 / 255.0  # below one 8-bit grey level no pixel of the attack image can differ from gray
START_NOISE = 0.25 / 255.0  # std of the seeded start noise per pixel: a quarter of a grey level
LOW_FREQUENCY_FACTOR = 4  # low_frequency: one variable per 4 x 4 pixels


def jitter_pixels(size: int) -> int:
    """jitter's largest shift per direction: 1/16 of the side (4 pixels at 64², 14 at 224²)."""
    return max(1, size // 16)


def default_eps(size: int) -> float:
    """The paper's eps for a size x size input: L2 norms grow with sqrt(pixels), i.e. with the side."""
    return PAPER_EPS * size / PAPER_SIZE


def max_eps(size: int) -> float:
    """The distance from gray to the corners of the [0, 1] box of a 3 x size x size input: the ball
    of this radius already holds the whole box, so a larger eps attacks exactly the same images."""
    return BOX_HALF_WIDTH * math.sqrt(3.0) * size


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j * steps): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); duplicates (few steps) merged."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # The epsilon keeps 0.22 * 100 = 22.000000000000004 from rounding up to 23.
    return sorted({w for w in (math.ceil(q * steps - 1e-9) for q in p[1:]) if 0 < w <= steps})


@dataclass(frozen=True)
class AttackFrame:
    """The current images after `step` update steps (step 0: the gray start)."""

    step: int
    alphas: np.ndarray  # [B] float32, alpha of each image's component
    probs: np.ndarray  # [B] float32, p(k|x)
    images: np.ndarray  # [B, S, S, 3] uint8


@dataclass(frozen=True)
class AttackResult:
    """The best image found for each component (the highest alpha over all steps)."""

    class_index: int
    components: tuple[int, ...]
    eps: float
    steps: int
    parameterization: AttackParameterizationName
    start_alphas: np.ndarray  # [B] float32, at the gray image (exactly gray: without the start noise)
    final_alphas: np.ndarray  # [B] float32, at `pixels`
    final_probs: np.ndarray  # [B] float32, p(k|x) at `pixels`
    images: np.ndarray  # [B, S, S, 3] uint8, `pixels` rounded for display
    pixels: torch.Tensor  # [B, 3, S, S] float32 in [0, 1] on the CPU: the exact images


def feature_attack(
    backend: Backend,
    components: ClassComponents,
    indices: Sequence[int],
    *,
    eps: float | None = None,
    steps: int | None = None,
    frame_every: int = DEFAULT_FRAME_EVERY,
    seed: int = 0,
    cancel: threading.Event | None = None,
    parameterization: AttackParameterizationName | None = None,
) -> Iterator[AttackFrame | AttackResult]:
    """Attack components `indices` of a class as one batch; yields frames, then one AttackResult.

    eps defaults to the paper's 30 at 224² scaled to the model's input side, steps to 200; it
    must lie in [MIN_EPS, max_eps(side)], beyond which it bounds nothing (and overflows).
    Frames come every `frame_every` steps (0: none). `seed` drives all randomness: the start
    noise, jitter's shifts, and the first step of a component whose gradient still vanishes
    there (a seeded random direction). `parameterization` (None: pixel) is one of
    ATTACK_PARAMETERIZATIONS. Setting `cancel` stops the attack at the next step with
    Cancelled. Arguments are checked here, before the first frame is asked for.
    """
    objective = ComponentObjective(backend, components, indices, "feature attacks")
    eps = default_eps(backend.input_size) if eps is None else float(eps)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidInput(f"eps must be a positive number, got {eps}")
    largest = max_eps(backend.input_size)
    if not MIN_EPS <= eps <= largest:
        raise InvalidInput(  # both ends rounded inwards, so that the numbers quoted are accepted
            f"eps must be between {math.ceil(MIN_EPS * 1e4) / 1e4:g} (one grey level) and "
            f"{math.floor(largest * 100) / 100:g} (from gray to a corner of the [0, 1] box of model "
            f"{backend.name}'s {backend.input_size}x{backend.input_size} input; a larger radius bounds nothing), "
            f"got {eps:g}"
        )
    if steps < 1:
        raise InvalidInput(f"steps must be at least 1, got {steps}")
    if frame_every < 0:
        raise InvalidInput(f"frame_every must be >= 0, got {frame_every}")
    parameterization = parameterization or DEFAULT_ATTACK_PARAMETERIZATION
    if parameterization not in ATTACK_PARAMETERIZATIONS:
        raise InvalidInput(
            f"unknown attack parameterization {parameterization!r}; use one of {', '.join(ATTACK_PARAMETERIZATIONS)}"
        )
    space = _Space(parameterization, objective.device, len(objective), backend.input_size, eps)
    return _apgd(objective, space, eps, steps, frame_every, seed, cancel)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)


def _total(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(1, 2, 3), keepdim=True)


class BallBoxProjection:
    """Euclidean projection of each row onto {||delta|| <= eps} ∩ {|delta| <= BOX_HALF_WIDTH}, in place.

    The projection is clamp(s delta) for the largest s <= 1 whose clamped point lies in the
    ball. The ball's own scale s0 = eps / ||delta|| (the usual shortcut) is feasible but wastes
    the budget that clamping then cuts off, and near the box that costs alpha. With A the
    squared mass of the coordinates left unclamped at s0 and B = h² for each clamped one,
    r(s)² = sum(min(s² delta², h²)) <= s² A + B, so solving s² A + B = eps² gives a feasible
    s >= s0 that is exact unless more coordinates clamp between s0 and s.

    Scratch tensors are kept between calls: on CPU a fresh image-sized tensor costs page
    faults worth several element-wise passes.
    """

    def __init__(self, like: torch.Tensor, eps: float) -> None:
        self.eps = eps
        self.squares = torch.empty_like(like)
        self.free = torch.empty_like(like)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        h2, eps2 = BOX_HALF_WIDTH**2, self.eps**2
        squares = torch.square(delta, out=self.squares)
        total = _total(squares)
        shortcut = total.rsqrt().mul_(self.eps)  # rsqrt(0) = inf: then the scale is 1
        bound = total.mul_(h2 / eps2).clamp_(min=h2)  # (h / min(s0, 1))²
        # A comparison into a float tensor: several times faster on CPU than into a bool one.
        free = torch.lt(squares, bound, out=self.free)  # 1 where unclamped at s0
        numerator = _total(free).mul_(h2).add_(eps2 - h2 * delta[0].numel()).clamp_(min=0.0)
        scale = numerator.div_(_total(free.mul_(squares)).clamp_(min=1e-30)).sqrt_()
        scale = torch.maximum(scale, shortcut).clamp_(max=1.0)
        return delta.mul_(scale).clamp_(-BOX_HALF_WIDTH, BOX_HALF_WIDTH)


class _Space:
    """Where APGD moves for a parameterisation: the variable v, the image change delta(v) it
    stands for, the chain rule back to v, and the projection of v onto the feasible set."""

    def __init__(self, name: AttackParameterizationName, device: torch.device, batch: int, size: int, eps: float) -> None:
        self.name, self.size = name, size
        side = -(-size // LOW_FREQUENCY_FACTOR) if name == "low_frequency" else size
        self.shape = (batch, 3, side, side)
        self.jitter = jitter_pixels(size) if name == "jitter" else 0
        # A step of 2 eps in delta is ~2 eps / factor on the coarse grid (each variable spreads over factor² pixels).
        self.first_step = 2.0 * eps / (LOW_FREQUENCY_FACTOR if name == "low_frequency" else 1)
        self.eps = eps
        self._ball_box = None if name == "low_frequency" else BallBoxProjection(torch.empty(self.shape, device=device), eps)

    def delta(self, v: torch.Tensor) -> torch.Tensor:
        """x - gray [B,3,S,S] for the variable v (v itself, except on the coarse grid)."""
        if self.name != "low_frequency":
            return v
        return F.interpolate(v, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def grad(self, v: torch.Tensor, grad_delta: torch.Tensor) -> torch.Tensor:
        """d alpha / d v from d alpha / d delta: the upsampling's adjoint on the coarse grid."""
        if self.name != "low_frequency":
            return grad_delta
        with torch.enable_grad():
            leaf = v.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.delta(leaf), leaf, grad_delta)
        return grad

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """v onto the feasible set, in place: Euclidean onto ball ∩ box for pixels; on the grid,
        the box (which bilinear weights keep), then the ball of the upsampled image by scaling."""
        if self._ball_box is not None:
            return self._ball_box(v)
        v.clamp_(-BOX_HALF_WIDTH, BOX_HALF_WIDTH)
        return v.mul_((self.eps / _norm(self.delta(v)).clamp_(min=1e-30)).clamp_(max=1.0))

    def shift(self, generator: torch.Generator) -> tuple[int, int]:
        """This step's roll (dy, dx): seeded, within ±jitter; (0, 0) without jitter."""
        if not self.jitter:
            return 0, 0
        dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
        return dy, dx


def _to_uint8(delta: torch.Tensor) -> np.ndarray:
    return (delta + GRAY).mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _apgd(
    objective: ComponentObjective,
    space: _Space,
    eps: float,
    steps: int,
    frame_every: int,
    seed: int,
    cancel: threading.Event | None,
) -> Iterator[AttackFrame | AttackResult]:
    """APGD on the variable v of `space` (for pixels, v = delta = x - gray, so the box is
    |delta| <= BOX_HALF_WIDTH and the ball ||delta|| <= eps).

    Per step: one forward and backward and about twenty element-wise passes over the batch,
    into tensors allocated once; all on the device, the host reads results at frame steps only.
    """
    device, batch, size = objective.device, len(objective), space.size
    inv_std = objective.std.reciprocal()
    gray_input = objective.gray_input
    model_input = torch.empty(batch, 3, size, size, device=device, requires_grad=True)
    generator = torch.Generator().manual_seed(seed)

    def evaluate(v: torch.Tensor, shift: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha [B], d alpha / d v and features [B,d] at gray + delta(v), rolled by `shift`."""
        with torch.no_grad():  # a leaf reused across steps: the last step's graph is gone
            torch.addcmul(gray_input, space.delta(v), inv_std, out=model_input)
        with objective.gradient_memory(batch), torch.enable_grad():
            seen = model_input.roll(shift, dims=(2, 3)) if any(shift) else model_input
            features = objective.backend.features_with_grad(seen)
            alpha = objective.alphas(features)
            (grad,) = torch.autograd.grad(alpha.sum(), model_input)  # rows are independent
        return alpha.detach(), space.grad(v, grad.mul_(inv_std)), features.detach()

    def noise() -> torch.Tensor:
        return torch.randn(space.shape[1:], generator=generator).to(device)

    with objective.gradient_memory(batch), torch.no_grad():
        gray_features = objective.backend.features_with_grad(gray_input.expand(batch, 3, size, size))
    start_alpha = objective.alphas(gray_features)
    # delta, prev_delta and z (variables, despite the names) rotate through three buffers; best_* are updated in place.
    delta = space.project(noise().mul_(START_NOISE).expand(space.shape).clone())
    prev_delta, z = delta.clone(), torch.empty_like(delta)
    alpha, grad, features = evaluate(delta, space.shift(generator))
    grad = torch.where(_norm(grad) > 0, grad, noise())  # a component dead on gray still moves
    if frame_every:  # the gray start itself; the noise is below what a PNG shows
        gray = torch.zeros(batch, 3, size, size, device=device)
        yield AttackFrame(0, _numpy(start_alpha), _numpy(objective.probs(gray_features)), _to_uint8(gray))

    eta = torch.full((batch,), space.first_step, device=device)  # APGD's initial step size
    best_alpha = alpha
    best_delta, best_grad, best_features = delta.clone(), grad.clone(), features.clone()
    prev_alpha = alpha
    increases = torch.zeros(batch, device=device)
    reduced_last = torch.zeros(batch, dtype=torch.bool, device=device)
    best_at_checkpoint = best_alpha
    checkpoints = apgd_checkpoints(steps)
    last_checkpoint = 0
    for step in range(1, steps + 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"feature attack cancelled after {step - 1} of {steps} steps")
        space.project(torch.addcmul(delta, grad, _column(eta) / _norm(grad).clamp_(min=1e-12), out=z))
        if step == 1:
            prev_delta, delta, z = delta, z, prev_delta
        else:  # delta + m (z - delta) + (1 - m)(delta - prev_delta) = lerp(2 delta - prev_delta, z, m)
            space.project(prev_delta.lerp_(delta, 2.0).lerp_(z, MOMENTUM))
            prev_delta, delta = delta, prev_delta
        alpha, grad, features = evaluate(delta, space.shift(generator))
        increases += alpha > prev_alpha
        prev_alpha = alpha
        improved = alpha > best_alpha
        best_alpha = torch.where(improved, alpha, best_alpha)
        # lerp with weights 0 / 1 is an exact select (end - (end - start) * 0 for 1), and on
        # CPU much faster than torch.where with a broadcast condition.
        take = improved.to(delta.dtype)
        best_delta.lerp_(delta, _column(take))
        best_grad.lerp_(grad, _column(take))
        best_features.lerp_(features, take[:, None])
        if frame_every and step % frame_every == 0:
            yield AttackFrame(step, _numpy(alpha), _numpy(objective.probs(features)), _to_uint8(space.delta(delta)))
        if checkpoints and step == checkpoints[0]:
            checkpoints.pop(0)
            # Halve where too few steps improved, or where neither the step size nor the best
            # alpha changed since the last checkpoint; those restart from their best point.
            stalled = (increases < RHO * (step - last_checkpoint)) | (
                ~reduced_last & (best_alpha <= best_at_checkpoint)
            )
            eta = torch.where(stalled, eta / 2.0, eta)
            restart = _column(stalled.to(delta.dtype))
            delta.lerp_(best_delta, restart)
            prev_delta.lerp_(best_delta, restart)  # no momentum across a restart
            grad.lerp_(best_grad, restart)
            prev_alpha = torch.where(stalled, best_alpha, prev_alpha)
            reduced_last, best_at_checkpoint = stalled, best_alpha
            increases.zero_()
            last_checkpoint = step

    best = space.delta(best_delta)
    if space.jitter:  # best_* were seen rolled: report the image as it is
        best_alpha, _, best_features = evaluate(best_delta)
    yield AttackResult(
        class_index=objective.class_index,
        components=tuple(objective.rows),
        eps=eps,
        steps=steps,
        parameterization=space.name,
        start_alphas=_numpy(start_alpha),
        final_alphas=_numpy(best_alpha),
        final_probs=_numpy(objective.probs(best_features)),
        images=_to_uint8(best),
        pixels=(best + GRAY).cpu(),
    )
