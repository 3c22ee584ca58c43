"""`make bench`: spurguard's performance targets, each measured side by side in one run.

1. Fit throughput vs a bare forward pass over the same images (same loader, same batches,
   efficientnet_lite0 on the CPU): target >= 0.95x.
2. Top-50 neural PCA at simulated ImageNet scale (random features, 1300 images a class,
   d = 2048): streaming statistics + top-50 eigensolver vs the reference approach (store every
   activation, np.cov + full eigh per class), on a few classes, extrapolated to 1000, with the
   peak memory of each measured in its own subprocess.
3. Score over gRPC: a server process, ScoreStream at batch 32 with efficientnet_lite0 on the
   CPU (fitted, with spurious labels, so decomposition and SpuFix run) vs the bare in-process
   forward of the same images at the same batch size: target >= 0.9x; plus p50/p99 latency of
   single-image unary Score.

Throughput comparisons run in paired rounds (the two sides back to back) and report the median
of the per-round ratios, which a noisy neighbour on a shared machine barely moves.

Run: `make bench` (or `.venv/bin/python bench/run.py [--quick] [--only SECTION]`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

IMAGENET_CLASSES, IMAGES_PER_CLASS, DIM, TOP = 1000, 1300, 2048, 50
SECTIONS = ("fit", "npca", "grpc", "attack")
ROUNDS, ROUNDS_QUICK = 3, 1  # paired rounds per throughput comparison


def _photo_dataset(root: Path, classes: int, per_class: int, folders: list[str] | None = None) -> None:
    """JPEGs cut from the photos that ship with scikit-image (no downloads); class k's folder is
    `folders[k]` (default: k)."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / (folders[k] if folders else str(k))
        folder.mkdir(parents=True)
        photo = photos[k % len(photos)]
        for i in range(per_class):
            h, w = photo.shape[:2]
            side = int(rng.integers(min(h, w) // 2, min(h, w)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            buffer = io.BytesIO()
            Image.fromarray(photo[y : y + side, x : x + side]).save(buffer, format="JPEG", quality=90)
            (folder / f"{i:04d}.jpg").write_bytes(buffer.getvalue())


def _paired_rounds(rounds: int, bare: Callable[[], object], ours: Callable[[], object]) -> tuple[float, float, float]:
    """(best bare seconds, best ours seconds, median of the per-round ratios bare/ours).

    Each round runs the two back to back, so both see the same load on a shared machine; the
    median ratio shrugs off a round in which a neighbour stole the cores.
    """
    bare_s, ours_s = [], []
    for _ in range(rounds):
        for run, seconds in ((bare, bare_s), (ours, ours_s)):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
    ratio = float(np.median(np.array(bare_s) / np.array(ours_s)))
    return min(bare_s), min(ours_s), ratio


def bench_fit_vs_forward(quick: bool) -> dict[str, float]:
    from spurguard.server.backends import load_model
    from spurguard.server.datasets import ClassResolver, list_image_folder
    from spurguard.server.serving.fitting import run_fit
    from spurguard.server.loader import iter_features
    from spurguard.server.store import Store

    backend = load_model("efficientnet_lite0", device="cpu")
    backend.warm_up()
    # Per class the fit adds a fixed cost (one eigensolve, one write) that ImageNet's 1300 images
    # a class amortise; 128 a class keeps the bench short and still realistic about it.
    classes, per_class = (1, 64) if quick else (2, 128)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        _photo_dataset(root, classes, per_class)
        entries = list_image_folder(root, ClassResolver(backend.class_names, backend.class_wnids))
        stores = iter(range(ROUNDS))

        def forward() -> None:
            for _ in iter_features(entries, backend, backend.max_batch_size):
                pass

        def fit() -> None:
            run_fit(backend, Store(Path(tmp) / f"store{next(stores)}"), root, num_components=TOP)

        forward_s, fit_s, ratio = _paired_rounds(ROUNDS_QUICK if quick else ROUNDS, forward, fit)
    n = len(entries)
    return {
        "images": n,
        "forward_images_per_s": n / forward_s,
        "fit_images_per_s": n / fit_s,
        "fit_vs_forward": ratio,
    }


def _class_features(seed: int, n: int) -> np.ndarray:
    """Post-ReLU-like features with a decaying low-rank structure (a well-posed top-50)."""
    rng = np.random.default_rng(seed)
    rank = 80
    loadings = rng.standard_normal((rank, DIM)).astype(np.float32)
    scales = (3.0 * 0.95 ** np.arange(rank)).astype(np.float32)
    latent = rng.standard_normal((n, rank)).astype(np.float32) * scales
    return np.maximum(latent @ loadings / np.sqrt(rank) + rng.standard_normal((n, DIM)).astype(np.float32) * 0.1 + 0.5, 0)


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _npca_worker(method: str, classes: int) -> None:
    """One approach on `classes` classes; prints seconds, peak RSS and the subspaces' digest."""
    import torch

    from spurguard.server.engine import NeuralPCAFit

    torch.set_num_threads(2)
    baseline_mib = _peak_rss_mib()  # interpreter + imports
    rng = np.random.default_rng(123)
    weight = rng.standard_normal((classes, DIM)).astype(np.float32)
    subspaces = []
    elapsed = 0.0
    if method == "reference":  # store every weighted activation of the dataset first
        stored = [(_class_features(k, IMAGES_PER_CLASS) * weight[k]).astype(np.float64) for k in range(classes)]
    for k in range(classes):
        if method == "ours":
            x = _class_features(k, IMAGES_PER_CLASS)  # stands in for one class's forward passes
            start = time.perf_counter()
            fit = NeuralPCAFit(weight)
            for i in range(0, IMAGES_PER_CLASS, 256):
                fit.update(x[i : i + 256], np.full(x[i : i + 256].shape[0], k))
            vectors = fit.finalize_class(k, TOP).vectors
        else:
            start = time.perf_counter()
            values, vecs = np.linalg.eigh(np.cov(stored[k], rowvar=False))
            vectors = vecs[:, ::-1][:, :TOP].T
        elapsed += time.perf_counter() - start
        subspaces.append(vectors)
    peak_mib = _peak_rss_mib() - baseline_mib
    np.save(sys.stdout.buffer, np.stack(subspaces))
    print(json.dumps({"seconds": elapsed, "peak_mib": peak_mib}), file=sys.stderr)


def _run_worker(method: str, classes: int) -> tuple[dict[str, float], np.ndarray]:
    # Ours uses numpy only to synthesise the features (a forward pass stands in for it in a real
    # fit); its OpenBLAS threads would keep spinning into the timed torch work and fight torch's
    # OpenMP pool for the cores (measured: 0.7-2.8 s a class instead of 0.1 s). The reference
    # times numpy itself, so it keeps its threads.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"} if method == "ours" else None
    done = subprocess.run(
        [sys.executable, __file__, "--npca-worker", method, "--classes", str(classes)],
        capture_output=True,
        check=True,
        env=env,
    )
    stats = json.loads(done.stderr.decode().strip().splitlines()[-1])
    return stats, np.load(io.BytesIO(done.stdout))


def bench_npca_scale(quick: bool) -> dict[str, float]:
    classes = 2 if quick else 4
    ours, ours_v = _run_worker("ours", classes)
    ref, ref_v = _run_worker("reference", classes)
    # same subspace: the projectors V^T V agree (eigenvector signs and rotations within ties drop out)
    difference = max(
        float(np.abs(a.T @ a - b.T @ b).max()) for a, b in zip(ours_v, ref_v)
    )
    scale = IMAGENET_CLASSES / classes
    # the reference stores every activation of the dataset before it can fit: float32 N x d
    stored_gib = IMAGENET_CLASSES * IMAGES_PER_CLASS * DIM * 4 / 2**30
    return {
        "classes_measured": classes,
        "ours_s_per_class": ours["seconds"] / classes,
        "reference_s_per_class": ref["seconds"] / classes,
        "ours_imagenet_hours": ours["seconds"] * scale / 3600,
        "reference_imagenet_hours": ref["seconds"] * scale / 3600,
        "speedup": ref["seconds"] / ours["seconds"],
        "ours_peak_mib": ours["peak_mib"],
        "reference_peak_mib_measured": ref["peak_mib"],
        "reference_imagenet_activation_gib": stored_gib,
        "max_subspace_difference": difference,
    }


GRPC_BATCH = 32


def _percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def bench_grpc_score(quick: bool) -> dict[str, float]:
    import torch

    from spurguard.client import Client, ScoreResult
    from spurguard.server.backends import load_model
    from spurguard.server.rpc.process import ServerProcess

    backend = load_model("efficientnet_lite0", device="cpu")
    backend.warm_up()
    per_class = 32 if quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        crops = Path(tmp) / "crops"
        _photo_dataset(crops, 2, per_class)
        paths = sorted(crops.rglob("*.jpg"))
        images = [p.read_bytes() for p in paths]
        pixels = backend.preprocess(images)

        def bare_forward() -> list[torch.Tensor]:
            return [
                backend.logits(backend.features(pixels[i : i + GRPC_BATCH])).argmax(1)
                for i in range(0, len(images), GRPC_BATCH)
            ]

        predicted = bare_forward()
        # file each image under the class the model predicts for it: the fit then covers the
        # classes that scoring analyses, so the decomposition and SpuFix really run
        root = Path(tmp) / "photos"
        for path, k in zip(paths, torch.cat(predicted).tolist()):
            (root / str(k)).mkdir(parents=True, exist_ok=True)
            path.rename(root / str(k) / f"{path.parent.name}-{path.name}")
        store = Path(tmp) / "store"
        args = ["--model", "efficientnet_lite0", "--store", str(store), "--data-root", str(root),
                "--max-batch-size", str(GRPC_BATCH), "--device", "cpu"]
        with ServerProcess(args, stderr=subprocess.DEVNULL) as server, Client(server.target) as client:
            *_, summary = client.fit("efficientnet_lite0", str(root), num_components=TOP)
            for fitted in summary.classes:  # classes with a single image are not fitted
                client.label("efficientnet_lite0", fitted.class_index, 0, "spurious")
            results: list[ScoreResult] = []

            def stream() -> None:
                results[:] = client.score_stream("efficientnet_lite0", images)

            bare_s, stream_s, ratio = _paired_rounds(ROUNDS_QUICK if quick else ROUNDS, bare_forward, stream)
            decomposed = sum(r.error is None and r.bias_term is not None for r in results)
            latencies = []
            for image in images[:20 if quick else 50]:
                start = time.perf_counter()
                client.score("efficientnet_lite0", [image])
                latencies.append(time.perf_counter() - start)
    n = len(images)
    return {
        "images": n,
        "bare_images_per_s": n / bare_s,
        "grpc_images_per_s": n / stream_s,
        "grpc_vs_bare": ratio,
        "p50_ms": _percentile_ms(latencies, 50),
        "p99_ms": _percentile_ms(latencies, 99),
        "decomposed": decomposed / n,
    }


ATTACK_COMPONENTS = 4


def bench_attack(quick: bool) -> dict[str, float]:
    import torch

    from spurguard.server.backends import load_model
    from spurguard.server.engine import fit_alphas, fit_components
    from spurguard.server.engine.decompose import class_projection
    from spurguard.server.visualize import feature_attack

    backend = load_model("efficientnet_lite0", device="cpu")
    steps = 6 if quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        _photo_dataset(Path(tmp), 1, 24)
        pixels = backend.preprocess([p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))])
    features = backend.features(pixels)
    weight, _ = backend.head()
    k = int(backend.logits(features).argmax(1).mode().values)
    components = fit_components(weight, features, torch.full((len(features),), k), ATTACK_COMPONENTS)[k]
    components.alphas = fit_alphas(components, weight[k], features)
    indices = list(range(ATTACK_COMPONENTS))

    projection = class_projection(components, weight[k])

    def bare_loop(count: int) -> None:
        x = torch.full((ATTACK_COMPONENTS, 3, backend.input_size, backend.input_size), 0.5)
        for _ in range(count):
            x.requires_grad_(True)
            alpha = (backend.features_with_grad(x) * projection.directions).sum(1) - projection.offsets
            (grad,) = torch.autograd.grad(alpha.sum(), x)
            x = (x.detach() + 0.01 * grad.sign()).clamp(0, 1)

    def attack() -> None:
        for _ in feature_attack(backend, components, indices, steps=steps, frame_every=0):
            pass

    bare_loop(1)  # warm-up: first-call allocations count for neither side
    # APGD evaluates the gray start as well as each step
    bare_s, attack_s, ratio = _paired_rounds(ROUNDS_QUICK if quick else ROUNDS, lambda: bare_loop(steps + 1), attack)
    return {
        "steps": steps,
        "attack_steps_per_s": steps / attack_s,
        "bare_steps_per_s": steps / bare_s,
        "attack_vs_bare": ratio,
    }


def _print_comparison(
    unit: str, bare: tuple[str, float], ours: tuple[str, float], ratio: tuple[str, float], target: float
) -> None:
    """Two throughputs (label, value) and their ratio against its target, aligned."""
    width = max(len(bare[0]), len(ours[0]), len(ratio[0]))
    for label, value in (bare, ours):
        print(f"  {label:{width}s} {value:9.3f} {unit}")
    print(f"  {ratio[0]:{width}s} {ratio[1]:9.3f}   (target >= {target})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--npca-worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.npca_worker:
        _npca_worker(args.npca_worker, args.classes)
        return 0
    sections = args.only or SECTIONS
    if "fit" in sections:
        fit = bench_fit_vs_forward(args.quick)
        print(f"[fit] {fit['images']} images, efficientnet_lite0 on the CPU, top-{TOP}")
        _print_comparison("images/s", ("bare forward", fit["forward_images_per_s"]), ("fit", fit["fit_images_per_s"]),
                          ("fit / forward", fit["fit_vs_forward"]), 0.95)
    if "npca" in sections:
        scale = bench_npca_scale(args.quick)
        print(f"\n[neural PCA at ImageNet scale] {IMAGES_PER_CLASS} images/class, d={DIM}, top-{TOP}; "
              f"{scale['classes_measured']} classes measured, extrapolated to {IMAGENET_CLASSES}")
        print(f"  {'':28s} {'ours':>12s} {'reference':>12s}")
        print(f"  {'seconds per class':28s} {scale['ours_s_per_class']:12.3f} {scale['reference_s_per_class']:12.3f}")
        print(f"  {'hours for 1000 classes':28s} {scale['ours_imagenet_hours']:12.3f} {scale['reference_imagenet_hours']:12.3f}")
        print(f"  {'peak memory above imports, MiB':28s} {scale['ours_peak_mib']:12.0f} {scale['reference_peak_mib_measured']:12.0f}")
        print(f"  speedup {scale['speedup']:.2f}x; the reference must also hold all activations of the "
              f"dataset: {scale['reference_imagenet_activation_gib']:.1f} GiB at ImageNet scale (ours: one batch)")
        print(f"  same subspace: max |P_ours - P_ref| = {scale['max_subspace_difference']:.2e}")
    if "grpc" in sections:
        grpc_score = bench_grpc_score(args.quick)
        print(f"\n[score over gRPC] {grpc_score['images']} images, efficientnet_lite0 on the CPU, batch {GRPC_BATCH}, "
              f"fitted classes with spurious labels ({grpc_score['decomposed']:.0%} of results decomposed)")
        _print_comparison("images/s", ("bare in-process forward (pre-decoded)", grpc_score["bare_images_per_s"]),
                          ("ScoreStream over gRPC (JPEG bytes)", grpc_score["grpc_images_per_s"]),
                          ("gRPC / bare", grpc_score["grpc_vs_bare"]), 0.9)
        print(f"  unary Score, one image: p50 {grpc_score['p50_ms']:.1f} ms, p99 {grpc_score['p99_ms']:.1f} ms")
    if "attack" in sections:
        attack = bench_attack(args.quick)
        print(f"\n[feature attack] efficientnet_lite0 on the CPU, {ATTACK_COMPONENTS} components as one batch, "
              f"{attack['steps']} steps")
        _print_comparison("steps/s", ("bare autograd loop", attack["bare_steps_per_s"]),
                          ("APGD attack", attack["attack_steps_per_s"]), ("attack / bare", attack["attack_vs_bare"]), 0.9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
