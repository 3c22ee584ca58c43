"""Train the demo CNN on a generated demo dataset and export it as a model directory.

    python -m spurguard.server.demo.train --data DATA --out DIR [--seed S] [--epochs E] [--data-seed S]
                                          [--eps EPS --attack-steps N --name NAME]

The export is a SPEC §2 model directory (model.toml, a torch.export backbone, a safetensors
head, classes.txt) plus train_report.json, whose numbers come from the exported files through
the backend the server uses: clean accuracy, how much the model relies on each planted feature,
whether class-wise neural PCA finds it, and what SpuFix does about it (`evaluate_demo_model`).
DATA is a dataset written by `generate`; when it does not exist yet, the default-size dataset
is generated there first (from --data-seed). The shipped model in spurguard/server/demo/model/
was made by this command with the defaults (seeds and settings in its report); its backbone was
exported with TorchScript then and re-exported with torch.export from the same weights since.

`--eps EPS` trains adversarially (Madry et al. 2018, with an L2 threat model): each batch is
replaced by its L2 PGD attack of radius EPS in [0, 1] pixel units (`--attack-steps` steps) before
the update. The built-in `demo_robust` in spurguard/server/demo/model_robust/ was made this way
(`make demo-robust-model`; its settings and the accuracy trade-off in its train_report.json): on
such a model a feature attack from gray draws the feature, which on the standard model it does
not (issue 13).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from spurguard.server.backends import Backend, PreprocessConfig, load_model_dir, preprocess_images
from spurguard.server.datasets import ClassResolver, ImageEntry, list_image_folder, list_spurious_folder
from spurguard.server.demo.generator import GROUND_TRUTH, generate, load_ground_truth
from spurguard.server.demo.model import DemoCNN
from spurguard.server.engine import (
    SpuFix,
    fit_alphas,
    fit_components,
    roc_auc,
    spurious_score_table,
)
from spurguard.vocab import SPUFIX_MODES, ScoreTable

DEMO_PREPROCESS = PreprocessConfig(size=64, resize=64, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
MODEL_NAME = "demo"
REPORT = "train_report.json"
BACKBONE = "backbone.pt2"
NUM_COMPONENTS = 10  # the planted feature must show up among the top 10 components of its class
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
# L1 weight on the mean feature: sparser, more selective units. Without it, in some runs a
# planted feature and its class's shape share units, and no component is the feature alone.
SPARSITY = 0.3
ATTACK_STEPS = 3  # PGD steps per batch in adversarial training: each costs one more forward and backward
_CHUNK = 256  # images decoded and preprocessed at a time
_THREADS = 2


def _images(entries: Sequence[ImageEntry], config: PreprocessConfig) -> torch.Tensor:
    """Normalised inputs [N,3,H,W], through the backends' own preprocessing."""
    return torch.cat([
        preprocess_images([e.path.read_bytes() for e in entries[i:i + _CHUNK]], config)
        for i in range(0, len(entries), _CHUNK)
    ])


def _labels(entries: Sequence[ImageEntry]) -> torch.Tensor:
    return torch.tensor([e.class_index for e in entries], dtype=torch.int64)


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image randomly flipped and turned by a multiple of 90 degrees, and the new row order.

    The classes are shapes at any rotation, so this gives eight views of every image for free;
    the planted features survive it (the stamp stays in a corner, the stripes diagonal).
    """
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    turns = torch.randint(4, (len(x),), generator=generator)
    groups = [(turns == k).nonzero().squeeze(1) for k in range(4)]
    return torch.cat([x[rows].rot90(k, (2, 3)) for k, rows in enumerate(groups)]), torch.cat(groups)


def l2_pgd(
    model: DemoCNN, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, config: PreprocessConfig
) -> torch.Tensor:
    """Inputs x (normalised) moved to raise the cross-entropy, by at most eps in L2 in [0, 1]
    pixel units and staying in the [0, 1] box: `steps` normalised-gradient steps of 2.5 eps /
    steps from x itself (Madry et al.'s step rule), each followed by the ball's and the box's
    projections. Pixel units, so that eps means what Visualize's eps means."""
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    pixels = x * std + torch.tensor(config.mean).view(1, 3, 1, 1)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta / std), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(grad, dim=(1, 2, 3), keepdim=True).clamp_(min=1e-12)
            delta = delta + (2.5 * eps / steps) * grad / norm
            delta = delta * (eps / torch.linalg.vector_norm(delta, dim=(1, 2, 3), keepdim=True).clamp_(min=eps))
            delta = (pixels + delta).clamp_(0.0, 1.0) - pixels
    return x + delta.detach() / std


def train_model(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    seed: int,
    epochs: int = EPOCHS,
    eps: float = 0.0,
    attack_steps: int = ATTACK_STEPS,
    config: PreprocessConfig = DEMO_PREPROCESS,
) -> tuple[DemoCNN, list[float]]:
    """AdamW with a one-cycle schedule on inputs x [N,3,H,W] and labels y [N]; deterministic for a
    seed on one machine. eps > 0: on each batch's L2 PGD attack (`l2_pgd`) instead. Returns the
    model in eval mode and each epoch's mean cross-entropy (on the attacked batches)."""
    torch.manual_seed(seed)
    model = DemoCNN(num_classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * -(-len(x) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
            inputs, rows = _dihedral(x[batch], generator)
            labels = y[batch][rows]
            if eps > 0:
                inputs = l2_pgd(model, inputs, labels, eps, attack_steps, config)
            phi = model.backbone(inputs)
            cross_entropy = F.cross_entropy(model.head(phi), labels)
            optimiser.zero_grad()
            (cross_entropy + SPARSITY * phi.mean()).backward()
            optimiser.step()
            schedule.step()
            total += cross_entropy.item() * len(batch)
        losses.append(total / len(x))
    return model.eval(), losses


def export_model_dir(
    model: DemoCNN, out: Path, class_names: Sequence[str], config: PreprocessConfig, name: str = MODEL_NAME
) -> None:
    """Write a SPEC §2 model directory: torch.export backbone (any batch size), safetensors head,
    classes, model.toml. torch.export rather than TorchScript: torch has deprecated the latter."""
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, config.size, config.size)
    exported = torch.export.export(model.backbone.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(exported, str(out / BACKBONE))
    head = {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()}
    safetensors.torch.save_file(head, str(out / "head.safetensors"))
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    mean, std = (", ".join(repr(v) for v in values) for values in (config.mean, config.std))
    (out / "model.toml").write_text(
        f'name = "{name}"\nbackbone = "{BACKBONE}"\nhead = "head.safetensors"\nclasses = "classes.txt"\n\n'
        f'[preprocess]\nsize = {config.size}\nresize = {config.resize}\ninterpolation = "{config.interpolation}"\n'
        f"mean = [{mean}]\nstd = [{std}]\n",
        encoding="utf-8",
    )


def backend_features(backend: Backend, entries: Sequence[ImageEntry]) -> torch.Tensor:
    """phi(x) [N,d] of image files, through the backend's preprocessing and backbone."""
    return torch.cat([
        backend.features(backend.preprocess([e.path.read_bytes() for e in entries[i:i + _CHUNK]]))
        for i in range(0, len(entries), _CHUNK)
    ])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def evaluate_demo_model(backend: Backend, data: Path, num_components: int = NUM_COMPONENTS) -> dict[str, Any]:
    """The science of SPEC §4 on a generated dataset, with the engine in memory.

    Per planted feature of class k: its reliance (share of its spurious-test images predicted k);
    class k's top components, fitted on the training set, each scored by the ROC AUC of its alpha
    at telling k's training images with the feature from those without; the best one labelled
    spurious. Then the spurious score (clean test of k against the feature's spurious test) and
    the clean accuracy, without SpuFix and with it in both modes.
    """
    data = Path(data)
    truth = load_ground_truth(data)
    resolver = ClassResolver(truth.classes)
    train = list_image_folder(data / "train", resolver)
    clean = list_image_folder(data / "clean_test", resolver)
    spurious = list_spurious_folder(data / "spurious_test", len(truth.classes))
    weight, _ = backend.head()
    phi_train, phi_clean, phi_spur = (backend_features(backend, e) for e in (train, clean, spurious))
    y_train, y_clean, y_spur = (_labels(e) for e in (train, clean, spurious))
    clean_logits, spur_logits = backend.logits(phi_clean), backend.logits(phi_spur)

    components = fit_components(weight, phi_train, y_train, num_components)
    for k, comp in components.items():
        rows = (y_train == k).nonzero().squeeze(1)
        comp.image_ids = [train[i].image_id for i in rows.tolist()]
        comp.alphas = fit_alphas(comp, weight[k], phi_train[rows])

    features, spurious_labels = [], {}
    spur_folders = np.array([e.image_id.split("/", 1)[0] for e in spurious])
    spur_predicted = spur_logits.argmax(dim=1).numpy()
    for feature in truth.features:
        k = feature.class_index
        comp = components[k]
        has = np.array([truth.images[f"train/{image_id}"].has(feature.name) for image_id in comp.image_ids])
        aucs = [roc_auc(has, comp.alphas[:, l]) for l in range(comp.num_components)]
        best = int(np.argmax(aucs))
        spurious_labels[k] = [best]
        shown = spur_folders == Path(feature.spurious_folder).name
        features.append({
            "name": feature.name,
            "kind": feature.kind,
            "class_index": k,
            "class_name": truth.classes[k],
            "reliance": float((spur_predicted[shown] == k).mean()),
            "best_component": best,
            "best_auc": aucs[best],
            "component_aucs": aucs,
        })

    def table(clean_z: torch.Tensor, spur_z: torch.Tensor) -> ScoreTable:
        return spurious_score_table(clean_z, y_clean, spur_z, y_spur)

    accuracy = _accuracy(clean_logits, y_clean)
    baseline = table(clean_logits, spur_logits)
    scores: dict[str, Any] = {"baseline": baseline.to_dict()}
    fix = SpuFix(components, spurious_labels, weight)
    for mode in SPUFIX_MODES:
        fixed_clean, fixed_spur = fix.apply(phi_clean, clean_logits, mode), fix.apply(phi_spur, spur_logits, mode)
        fixed = table(fixed_clean, fixed_spur)
        fixed_accuracy = _accuracy(fixed_clean, y_clean)
        scores[mode] = {
            **fixed.to_dict(),
            "mean_auc_gain": fixed.mean_auc - baseline.mean_auc,
            "clean_accuracy": fixed_accuracy,
            "accuracy_drop": accuracy - fixed_accuracy,
        }
    return {"clean_accuracy": accuracy, "num_components": num_components, "features": features, "spurious_score": scores}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, export, evaluate the export; writes and returns the report."""
    parser = argparse.ArgumentParser(description="Train the demo CNN and export a model directory.")
    parser.add_argument("--data", type=Path, required=True, help="a demo dataset; generated when absent")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed when DATA is generated")
    parser.add_argument("--eps", type=float, default=0.0,
                        help="L2 radius of adversarial training, [0, 1] pixel units (default 0: standard training)")
    parser.add_argument("--attack-steps", type=int, default=ATTACK_STEPS,
                        help=f"PGD steps per batch when --eps > 0 (default {ATTACK_STEPS})")
    parser.add_argument("--threads", type=int, default=_THREADS,
                        help=f"torch threads (default {_THREADS}; 1 runs faster on a machine shared with other work)")
    parser.add_argument("--name", default=MODEL_NAME, help=f"the model's name in model.toml (default {MODEL_NAME})")
    args = parser.parse_args(argv)
    if args.eps < 0 or args.attack_steps < 1 or args.threads < 1:
        parser.error("--eps must be >= 0, --attack-steps and --threads >= 1")
    if not (args.data / GROUND_TRUTH).is_file():
        print(f"generating the demo dataset in {args.data}", file=sys.stderr)
        generate(args.data, args.data_seed)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    truth = load_ground_truth(args.data)
    entries = list_image_folder(args.data / "train", ClassResolver(truth.classes))
    start = time.perf_counter()
    model, losses = train_model(
        _images(entries, DEMO_PREPROCESS), _labels(entries), len(truth.classes), seed=args.seed, epochs=args.epochs,
        eps=args.eps, attack_steps=args.attack_steps,
    )
    seconds = time.perf_counter() - start
    export_model_dir(model, args.out, truth.classes, DEMO_PREPROCESS, args.name)
    report = {
        "name": args.name,
        "seed": args.seed,
        "epochs": args.epochs,
        "eps": args.eps,
        "attack_steps": args.attack_steps if args.eps > 0 else 0,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "sparsity": SPARSITY,
        "threads": args.threads,
        "torch": torch.__version__,
        "generator": asdict(truth.config),
        "train_seconds": round(seconds, 1),
        "epoch_losses": losses,
        **evaluate_demo_model(load_model_dir(args.out, device="cpu"), args.data),
    }
    (args.out / REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "epoch_losses"}, indent=1))
    return report


if __name__ == "__main__":
    main()
