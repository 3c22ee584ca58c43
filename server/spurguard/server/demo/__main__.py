"""`make demo` / `spurguard demo`: the main job end to end on the embedded demo.

Generates the planted-spurious data, starts a real server process with the demo model, fits
every class, plays the human labeller from the generator's ground truth (through the same
Label API a person would use), scores a mixed batch of "production" images, and evaluates the
spurious score without and with SpuFix in both modes. Then it does what the paper did: the same
labelling on the adversarially robust demo model (demo_robust, whose feature attacks show the
features), a transfer of those labels to the standard model (max_cov), and the standard model's
spurious score with its own labels vs with the transferred ones. Everything goes over gRPC, with
auth on: a fresh token file each run, an admin token for the demo and a label token for a person.

`--keep-serving` leaves the server running afterwards, for labelling in the browser: the demo
prints the `spurguard ui` command with the label token, and stops the server on Ctrl-C / SIGTERM.

`--data-only DIR` only writes the dataset (train / clean_test / spurious_test folders, masks,
classes.txt and ground_truth.json) into DIR, for running the steps by hand; no server starts.
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from spurguard.client import Client, ScoreResult
from spurguard.client.cli.format import render_table
from spurguard.client.cli.progress import Progress, evaluate_line, fit_line
from spurguard.client.cli.report import write_report
from spurguard.server.backends.argtypes import at_least_one
from spurguard.server.demo.generator import (
    GeneratorConfig,
    GroundTruth,
    generate,
    load_ground_truth,
    without_feature,
)
from spurguard.server.demo.planted import LABEL_SEARCH, MIN_AUC, Contrast, label_planted_features
from spurguard.server.rpc import auth
from spurguard.server.rpc.process import ServerProcess
from spurguard.vocab import EvaluateResult, FitSummary, SpuriousDirectionsName, TransferSummary

MODEL = "demo"
ROBUST = "demo_robust"  # the discovery model: labelled here, its labels transferred to MODEL
T = TypeVar("T")
REPORT_COMPONENTS = 5  # per planted class, in the HTML report
REPORT_STEPS = 50  # attack steps per component: enough at 64x64 to show the feature
TOKEN_FILE = "tokens.toml"  # in the workdir, rewritten each run: only the tokens' sha256
LABELLER = "labeller"  # the label token's name, which the labelling page shows as who labelled
UI_URL = "http://127.0.0.1:8080/"  # where `spurguard ui` opens by default
STOP_POLL_S = 0.2  # while kept serving: how often Ctrl-C / SIGTERM and the server's exit are looked at


def _progress() -> Progress:
    return Progress(sys.stderr, "tty" if sys.stderr.isatty() else "plain", interval_s=5.0)


def _dataset(workdir: Path, config: GeneratorConfig) -> tuple[Path, GroundTruth]:
    """The generated data; regenerated only when missing or made with other settings."""
    root = workdir / "data"
    try:
        truth = load_ground_truth(root)
        if truth.config == config:
            return root, truth
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    generate(root, **asdict(config))
    print(f"generated the planted-spurious dataset in {time.monotonic() - started:.1f}s: {root}")
    return root, load_ground_truth(root)


def _follow(stream: Iterable[Any], final: type[T], line: Callable[[Any], str]) -> T:
    """The last item of a job's stream (a `final`), its progress updates shown on stderr."""
    progress, result = _progress(), None
    for update in stream:
        if isinstance(update, final):
            result = update
        else:
            progress.update(line(update), update.phase)
    progress.close()
    assert result is not None, f"the stream ended without a {final.__name__}"
    return result


def fit_all(client: Client, train: Path, model: str = MODEL) -> FitSummary:
    summary = _follow(client.fit(model, str(train)), FitSummary, fit_line)
    print(f"fitted {model}: {len(summary.classes)} classes on {summary.images} images in {summary.elapsed_s:.1f}s "
          f"(fit {summary.fit_id})")
    return summary


def label_from_ground_truth(
    client: Client, data: Path, truth: GroundTruth, model: str = MODEL, contrast: Contrast = "in_class"
) -> list[tuple[str, int, int, float]]:
    """For each planted feature, the component of its class whose alphas best separate the
    contrast (`label_planted_features`: in-class, the class's training images with the feature
    from those without it; feature_only, the feature without the class from clean images),
    alphas over gRPC: labelled spurious when its AUC reaches MIN_AUC."""

    def alphas_of(k: int, ids: Sequence[str]) -> np.ndarray:
        results = client.score(model, [str(data / i) for i in ids], class_index=k, top=0)
        return np.array([[c.alpha for c in sorted(r.components, key=lambda c: c.index)] for r in results])

    chosen = []
    for found in label_planted_features(truth, alphas_of, contrast=contrast, search=LABEL_SEARCH):
        if not found.accepted:
            print(f"{found.feature}: no component of class {truth.classes[found.class_index]} reaches AUC {MIN_AUC} "
                  f"(best {found.component}: {found.auc:.3f}); not labelled")
            continue
        feature = next(f for f in truth.features if f.name == found.feature)
        client.label(model, found.class_index, found.component, "spurious",
                     note=f"planted {feature.name} ({feature.kind}); AUC {found.auc:.3f}")
        chosen.append((found.feature, found.class_index, found.component, found.auc))
    print(f"\n{model} labelled from ground truth (the labeller's choice among the top 10 components):")
    print(render_table(
        ["feature", "class", "component", "AUC feature vs not"],
        [[name, truth.classes[k], str(c), f"{auc:.3f}"] for name, k, c, auc in chosen],
        right=[2, 3],
    ))
    return chosen


def production_batch(truth: GroundTruth, per_class: int, per_feature: int) -> list[str]:
    """A deterministic mix of clean test images and spurious-test images (a planted feature without
    its class's object: on every other one, a smaller object of another class)."""
    picked: list[str] = []
    for k in range(len(truth.classes)):
        picked += sorted(i for i, t in truth.images.items() if t.split == "clean_test" and t.class_index == k)[:per_class]
    for feature in truth.features:
        picked += sorted(i for i, t in truth.images.items() if t.split == "spurious_test" and t.has(feature.name))[:per_feature]
    return picked


def _shows(truth: GroundTruth, image_id: str) -> str:
    image = truth.images[image_id]
    if image.class_index is not None:
        return truth.classes[image.class_index]
    return "(" + "+".join(f.name for f in image.features) + " only)"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _without_feature(
    client: Client, truth: GroundTruth, images: Sequence[str], results: Sequence[ScoreResult]
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth for `trigger` (SPEC: the feature is what makes it class k), from each image
    re-rendered without its planted feature. Per image: (caused) True when it is predicted as
    the class of a planted feature it carries and the counterfactual is not; (effect) how much
    the feature adds to that class's logit, NaN for images not predicted as such a class."""
    tied = {f.name: f.class_index for f in truth.features}
    caused, effect = np.zeros(len(images), dtype=bool), np.full(len(images), np.nan)
    for k in sorted(set(tied.values())):
        rows = [
            row for row, (image_id, r) in enumerate(zip(images, results))
            if r.class_index == k and any(tied[f.name] == k for f in truth.images[image_id].features)
        ]
        if not rows:
            continue
        counterfactuals = [without_feature(truth.config, images[row]) for row in rows]
        for row, r in zip(rows, client.score(MODEL, counterfactuals, class_index=k)):
            caused[row] = r.predictions[0].class_index != k
            effect[row] = results[row].logit - r.logit
    return caused, effect


def score_production(client: Client, data: Path, truth: GroundTruth, images: Sequence[str]) -> dict[str, float | None]:
    results: list[ScoreResult] = client.score(MODEL, [str(data / i) for i in images], spufix="floor")
    rows = []
    for image_id, r in zip(images, results):
        rows.append([
            image_id.split("/", 1)[1], _shows(truth, image_id), r.predictions[0].name,
            f"{r.predictions[0].prob:.2f}", "TRIGGER" if r.trigger else "-", f"{r.spurious_alpha:.3f}",
            r.spufix.predictions[0].name if r.spufix else "-",
        ])
    print("\nproduction batch (SpuFix floor mode):")
    print(render_table(["image", "shows", "predicted", "prob", "trigger", "spurious_alpha", "SpuFix predicts"],
                       rows, right=[3, 5]))
    should, effect = _without_feature(client, truth, images, results)
    fired = np.array([r.trigger for r in results])
    hits = int((should & fired).sum())
    precision = hits / fired.sum() if fired.any() else None  # undefined without any trigger
    recall = hits / should.sum() if should.any() else None
    print(f"\ntriggers: {int(fired.sum())} fired; {int(should.sum())} images are predicted as a feature's class "
          f"only because of the feature (without it, re-rendered, the top-1 changes); "
          f"precision {_share(precision)}, recall {_share(recall)}")
    affected = ~np.isnan(effect)
    removed = np.array([r.spurious_alpha for r in results])
    if affected.any():
        print(f"on the {int(affected.sum())} images predicted as the class of a feature they carry, the feature adds "
              f"{effect[affected].mean():.2f} to that logit on average and floor SpuFix removes "
              f"{removed[affected].mean():.2f}: its floor is the component's level on the class's own fit images, "
              "and without the class object the component sits lower")
    return {"images": len(images), "fired": int(fired.sum()), "should_fire": int(should.sum()),
            "precision": precision, "recall": recall,
            "feature_logit_effect": float(effect[affected].mean()) if affected.any() else None,
            "spufix_removed": float(removed[affected].mean()) if affected.any() else None}


def evaluate_both(client: Client, data: Path, truth: GroundTruth) -> dict[str, EvaluateResult]:
    results = {mode: _follow(client.evaluate(MODEL, str(data / "clean_test"), str(data / "spurious_test"),
                                             spufix=mode), EvaluateResult, evaluate_line)
               for mode in ("paper", "floor")}
    base = results["floor"].baseline
    rows = []
    for i, row in enumerate(base.classes):
        paper, floor = results["paper"].spufix.classes[i], results["floor"].spufix.classes[i]
        rows.append([truth.classes[row.class_index], f"{row.auc:.3f}", f"{paper.auc:.3f}", f"{floor.auc:.3f}",
                     f"{row.ap:.3f}", f"{paper.ap:.3f}", f"{floor.ap:.3f}",
                     f"{row.spurious_frac_predicted:.2f}", f"{floor.spurious_frac_predicted:.2f}"])
    paper_t, floor_t = results["paper"].spufix, results["floor"].spufix
    rows.append(["mean", f"{base.mean_auc:.3f}", f"{paper_t.mean_auc:.3f}", f"{floor_t.mean_auc:.3f}",
                 f"{base.mean_ap:.3f}", f"{paper_t.mean_ap:.3f}", f"{floor_t.mean_ap:.3f}",
                 f"{base.spurious_frac_predicted:.2f}", f"{floor_t.spurious_frac_predicted:.2f}"])
    print("\nspurious score (clean test vs spurious-only images; AUC / AP of p(k|x)), without -> with SpuFix:")
    print(render_table(
        ["class", "AUC", "AUC paper", "AUC floor", "AP", "AP paper", "AP floor", "fooled", "fooled floor"],
        rows, right=range(1, 9),
    ))
    print(f"clean accuracy: {base.clean_accuracy:.3f} without SpuFix, {paper_t.clean_accuracy:.3f} paper, "
          f"{floor_t.clean_accuracy:.3f} floor")
    return results


def _evaluate(client: Client, data: Path, directions: SpuriousDirectionsName) -> EvaluateResult:
    """The standard model's spurious score with floor SpuFix removing `directions`."""
    stream = client.evaluate(MODEL, str(data / "clean_test"), str(data / "spurious_test"), spufix="floor",
                             directions=directions)
    return _follow(stream, EvaluateResult, evaluate_line)


def transfer_from_robust(client: Client, data: Path, truth: GroundTruth) -> dict[str, object]:
    """The paper's pipeline: label the robust model (feature-only contrast: the feature without
    the class), carry its labels to the standard model with max_cov, and compare the standard
    model's floor SpuFix with its own labels against the transferred ones."""
    fit_all(client, data / "train", ROBUST)
    labels = label_from_ground_truth(client, data, truth, ROBUST, contrast="feature_only")
    moved = _follow(client.transfer(ROBUST, MODEL), TransferSummary, fit_line)
    print(f"transferred {sum(len(c.directions) for c in moved.classes)} labelled directions of {ROBUST} to {MODEL} "
          f"(transfer {moved.transfer_id}) over {moved.images} images")
    own, transferred = _evaluate(client, data, "own"), _evaluate(client, data, "transferred")
    base = own.baseline
    rows = [[name, f"{table.mean_auc:.3f}", f"{table.mean_ap:.3f}", f"{table.clean_accuracy:.3f}"]
            for name, table in (("without SpuFix", base), (f"floor SpuFix, {MODEL}'s own labels", own.spufix),
                                (f"floor SpuFix, labels transferred from {ROBUST}", transferred.spufix))]
    print(f"\n{MODEL}'s spurious score with its own labels vs labels transferred from {ROBUST}:")
    print(render_table(["", "mean AUC", "mean AP", "clean accuracy"], rows, right=[1, 2, 3]))
    return {
        "robust_labels": [{"feature": n, "class": k, "component": c, "auc": a} for n, k, c, a in labels],
        "transfer_id": moved.transfer_id,
        "mean_auc": {"without": base.mean_auc, "own": own.spufix.mean_auc, "transferred": transferred.spufix.mean_auc},
        "clean_accuracy": {"without": base.clean_accuracy, "own": own.spufix.clean_accuracy,
                           "transferred": transferred.spufix.clean_accuracy},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spurguard demo", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="where data and store go (default .demo)")
    parser.add_argument("--data-only", type=Path, metavar="DIR",
                        help="only write the dataset and its ground truth into DIR (absent or empty) and exit; no server")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    defaults = GeneratorConfig()
    for flag, what in (("train-per-class", "training images per class"), ("test-per-class", "clean test images per class"),
                       ("spurious-per-feature", "spurious test images per planted feature")):
        default = getattr(defaults, flag.replace("-", "_"))
        parser.add_argument(f"--{flag}", type=at_least_one, default=default, metavar="N", help=f"{what} (default {default})")
    parser.add_argument("--summary", type=Path, help="also write the numbers as JSON to this file")
    parser.add_argument("--keep-serving", action="store_true",
                        help="afterwards keep the server running for labelling with `spurguard ui` (its command, "
                             "with a label token, is printed last) until Ctrl-C or SIGTERM")
    return parser


def write_data_only(root: Path, config: GeneratorConfig) -> None:
    """The dataset alone, with where each part went."""
    started = time.monotonic()
    dataset = generate(root, **asdict(config))
    print(f"wrote the planted-spurious dataset (seed {config.seed}) in {time.monotonic() - started:.1f}s:")
    for part, path in dataset.paths.items():
        print(f"  {part:<14} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = GeneratorConfig(args.seed, args.train_per_class, args.test_per_class, args.spurious_per_feature)
    if args.data_only is not None:
        try:
            write_data_only(args.data_only.resolve(), config)
        except (FileExistsError, ValueError) as error:
            parser.error(str(error))
        return 0
    workdir = args.workdir.resolve()
    data, truth = _dataset(workdir, config)
    store = workdir / "store"
    shutil.rmtree(store, ignore_errors=True)  # a fresh fit each run: the demo shows the whole job
    tokens = workdir / TOKEN_FILE
    admin, labeller = issue_tokens(tokens)
    serve = ["--model", MODEL, "--model", ROBUST, "--store", str(store), "--data-root", str(data),
             "--auth-tokens", str(tokens)]
    try:
        with _terminate_as_exit(), ServerProcess(serve) as server:
            print(f"server with the demo models {MODEL} and {ROBUST} on {server.target} (store {store}, tokens {tokens})")
            with Client(server.target, token=admin) as client:
                summary = run(client, workdir, data, truth)
            if args.summary:
                args.summary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            return finish(server, labeller, keep_serving=args.keep_serving)
    except KeyboardInterrupt:
        print("spurguard demo: interrupted; its server was stopped", file=sys.stderr)
        return 128 + signal.SIGINT


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM while inside raises SystemExit(143), as Ctrl-C raises KeyboardInterrupt, so the
    server process is stopped on the way out instead of outliving a demo killed mid-run."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def issue_tokens(path: Path) -> tuple[str, str]:
    """Fresh random tokens, written (hashed) to `path`: (admin, label). They live only in this
    process and on the screen, never in a file."""
    admin, labeller = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    auth.write_tokens(path, [auth.Token.of(MODEL, "admin", admin), auth.Token.of(LABELLER, "label", labeller)])
    return admin, labeller


def run(client: Client, workdir: Path, data: Path, truth: GroundTruth) -> dict[str, object]:
    """The whole demo on a running server; its numbers, for `--summary`."""
    fit = fit_all(client, data / "train")
    labels = label_from_ground_truth(client, data, truth)
    triggers = score_production(client, data, truth, production_batch(truth, per_class=3, per_feature=6))
    evaluation = evaluate_both(client, data, truth)
    transfer = transfer_from_robust(client, data, truth)
    for model in (MODEL, ROBUST):
        report = write_report(client, client.get_model(model), workdir / f"report-{model}",
                              [f.class_index for f in truth.features], top=REPORT_COMPONENTS, steps=REPORT_STEPS)
        print(f"\nreport for the labeller of {model} (components, attacks, heatmaps): {report['index']}")
    return {
        "fit": {"fit_id": fit.fit_id, "images": fit.images, "classes": len(fit.classes)},
        "labels": [{"feature": n, "class": k, "component": c, "auc": a} for n, k, c, a in labels],
        "triggers": triggers,
        "evaluate": {mode: result.to_dict() for mode, result in evaluation.items()},
        "transfer": transfer,
    }


def finish(server: ServerProcess, label_token: str, *, keep_serving: bool) -> int:
    """The demo's last words, then its exit code. Without `keep_serving`: how to keep the server
    (it stops when the demo ends). With it: the server's address and the `spurguard ui` command
    with the label token (the last line, so that it is what stays on screen), then serve until
    Ctrl-C or SIGTERM; 1 if the server itself ends first."""
    if not keep_serving:
        print("\nthe demo server stops now; to keep it serving for labelling in the browser (spurguard ui): "
              "make demo ARGS=--keep-serving, or spurguard demo --keep-serving")
        return 0
    with _stop_requests() as stop:  # before the command is printed: whoever reads it may stop the demo at once
        print(f"\nthe demo server keeps serving {MODEL} and {ROBUST} on {server.target} (pid {server.process.pid}) "
              "until Ctrl-C or SIGTERM")
        print(f"to label their components in the browser, run this (the token of {LABELLER!r}, role label, is shown "
              f"only here) and open {UI_URL}:")
        print(f"  spurguard ui --server {server.target} --token {label_token}", flush=True)
        while not stop and server.process.poll() is None:
            time.sleep(STOP_POLL_S)
    if stop:
        print(f"{signal.Signals(stop[0]).name}: stopping the demo server (pid {server.process.pid})", file=sys.stderr)
        return 0
    print(f"the demo server ended by itself (exit code {server.process.returncode})", file=sys.stderr)
    return 1


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """The SIGINT / SIGTERM received while inside, which no longer end the demo. Python-level
    handlers, not sigwait: grpc's threads leave the signals unblocked, so only a handler reliably
    sees them; and one that only appends, as a lock taken in a handler can deadlock its thread."""
    stop: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: stop.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
