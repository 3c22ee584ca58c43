"""`spurguard fit --store DIR …`: a fit in this process, with no server (a Kubernetes Job's pod).

Three modes, one program:
    --store DIR --model SPEC --data DIR                   the whole fit, committed to the store
    --store DIR --model SPEC --data DIR --shard I/N       shard I of N: partial statistics only
    --store DIR --model SPEC --merge N                    merge the N shards into the fit
Shards and their merge share a --job-id: it names the fit they make. `--shard auto/N` takes I
from $JOB_COMPLETION_INDEX, which Kubernetes sets in every pod of an Indexed Job. The backbone
runs where the model says (local torch, ONNX Runtime, OpenVINO, or Triton for a model.toml with
[triton]). The client CLI forwards here (spurguard.client.cli.run), so `spurguard fit` without
--store stays the command that asks a server.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from spurguard.server.backends.argtypes import at_least_one
from spurguard.server.backends import Backend, load_model
from spurguard.server.backends.runtimes import RUNTIME_CHOICES
from spurguard.server.datasets import ClassResolver
from spurguard.server.errors import SpurguardError
from spurguard.server.serving.fitting import run_fit
from spurguard.server.serving.models import select_forward
from spurguard.server.serving.sharding import merge_shards, run_shard, wait_for_shards
from spurguard.server.store import Store
from spurguard.server.store.database import SQLITE
from spurguard.server.store.store import onnx_graph
from spurguard.vocab import FitProgress, FitSummary

INDEX_ENV = "JOB_COMPLETION_INDEX"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _shard(text: str) -> tuple[int | None, int]:
    """`I/N` or `auto/N` (I from $JOB_COMPLETION_INDEX at run time) as (I or None, N)."""
    index, _, count = text.partition("/")
    try:
        num_shards = int(count)
        shard = None if index == "auto" else int(index)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be I/N or auto/N, got {text!r}") from None
    if num_shards < 1 or (shard is not None and not 0 <= shard < num_shards):
        raise argparse.ArgumentTypeError(f"need N >= 1 and 0 <= I < N, got {text!r}")
    return shard, num_shards


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def build_parser(prog: str = "spurguard fit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fit in this process, with no server: the whole fit, one shard of a sharded fit (a "
        "Kubernetes Indexed Job's pod), or the merge of its shards. The result goes into --store, where a "
        "server started on it serves it. Without --store, `spurguard fit` asks a server instead.",
        epilog="A sharded fit: run `spurguard fit --store S --model M --data D --job-id ID --shard I/N` for every "
        "I in 0..N-1 (anywhere that sees S and D; `--shard auto/N` reads I from $JOB_COMPLETION_INDEX), then "
        "`spurguard fit --store S --model M --job-id ID --merge N`. The merged fit equals the unsharded one: "
        "same components, alphas and image index.",
    )
    p.add_argument("--store", required=True, type=Path, metavar="DIR", help="the store to write (a server's --store)")
    p.add_argument("--model", required=True, metavar="SPEC", help="a built-in model name or a model directory, "
                   "as for `spurguard serve --model`")
    p.add_argument("--data", metavar="DIR", help="the image folder DIR/<class>/<image> (required but for --merge, "
                   "which takes the shards'; given there, it must be theirs)")
    p.add_argument("--classes", default="", metavar="K,K,…", help="classes to fit: indices or class names "
                   "(default: every class with images)")
    p.add_argument("--components", type=at_least_one, metavar="N", help="components kept per class (default: 50)")
    p.add_argument("--batch-size", type=at_least_one, metavar="N", help="images per forward pass (default: the model's)")
    p.add_argument("--job-id", metavar="ID", help="the fit's id (letters, digits, ., _ and -); required with "
                   "--shard and --merge, where it ties the shards and their merge together; the same id resumes "
                   "an interrupted fit or merge")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shard", type=_shard, metavar="I/N", help=f"run shard I of N only (I from 0; auto/N: I "
                      f"from ${INDEX_ENV}): a contiguous part of the sorted image listing, written as partial "
                      "statistics that --merge N combines")
    mode.add_argument("--merge", type=at_least_one, metavar="N", help="merge the N shards of --job-id into the fit and "
                      "make it current; a shard missing, still running or run with other settings is an error")
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="S", help="with --merge: wait up to S seconds for "
                   "the shards still missing (default 0: fail at once, naming them)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, help="where the backbone runs (default: the model's "
                   "runtime, else auto); a model.toml with [triton] runs it on Triton")
    p.add_argument("--labels", default=SQLITE, metavar="URL",
                   help="the label database of the servers on this store (a serve --labels: sqlite, or "
                        "postgresql://…): a fit's commit carries the labels of the fit it replaces there "
                        f"(default {SQLITE})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _classes(backend: Backend, text: str) -> list[int] | None:
    """--classes as indices: each an index, a wnid or a class name (as class folders are matched)."""
    if not text:
        return None
    resolver = ClassResolver(backend.class_names, backend.class_wnids)
    return [resolver.resolve(ref.strip()) for ref in text.split(",") if ref.strip()]


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.merge is None and args.data is None:
        parser.error("--data is required (except with --merge)")
    if (args.shard is not None or args.merge is not None) and args.job_id is None:
        parser.error("--job-id is required with --shard and --merge: the shards and their merge must name one fit")
    if args.wait and args.merge is None:
        parser.error("--wait goes with --merge")
    if args.shard is not None and args.shard[0] is None:
        index = os.environ.get(INDEX_ENV, "")
        if not index.isdigit() or int(index) >= args.shard[1]:
            parser.error(f"--shard auto/{args.shard[1]} needs ${INDEX_ENV} set to 0..{args.shard[1] - 1} "
                         f"(got {index!r})")
        args.shard = (int(index), args.shard[1])


def _progress(update: FitProgress) -> None:
    """A plain line on stderr at each phase and class."""
    print(f"fit {update.job_id}: {update.phase} {update.images_done}/{update.images_total} images, "
          f"{update.classes_done}/{update.classes_total} classes, {update.elapsed_s:.1f} s", file=sys.stderr, flush=True)


def _summary_text(summary: FitSummary) -> str:
    classes = ", ".join(f"{c.class_index} ({c.images} images, {c.num_components} components)" for c in summary.classes)
    return (f"fit {summary.fit_id} committed for model {summary.model}: {summary.images} images, "
            f"{summary.skipped_images} skipped, {summary.elapsed_s:.1f} s; classes {classes}")


def _run(args: argparse.Namespace) -> dict[str, object] | FitSummary:
    backend = load_model(args.model, args.device, args.batch_size)
    classes = _classes(backend, args.classes)
    if args.merge is not None:
        if args.wait:
            wait_for_shards(backend, args.store, args.job_id, args.merge, args.wait)
        with _store(args) as store:
            return merge_shards(backend, store, fit_id=args.job_id, num_shards=args.merge,
                                dataset_root=args.data, num_components=args.components, classes=classes,
                                progress=_progress).summary()
    select_forward(backend, args.runtime, partial(onnx_graph, args.store))
    components = {} if args.components is None else {"num_components": args.components}
    if args.shard is not None:
        shard, num_shards = args.shard
        return run_shard(backend, args.store, args.data, fit_id=args.job_id, shard=shard, num_shards=num_shards,
                         classes=classes, batch_size=args.batch_size, progress=_progress, **components).to_json()
    with _store(args) as store:
        return run_fit(backend, store, args.data, classes=classes, batch_size=args.batch_size,
                       fit_id=args.job_id, progress=_progress, **components).summary()


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[Store]:
    """The store with the servers' label database (commits write carried labels there)."""
    store = Store(args.store, args.labels)
    try:
        yield store
    finally:
        store.close()


def main(argv: Sequence[str] | None = None, prog: str = "spurguard fit") -> int:
    """0 done, 1 failed (the reason on stderr; with --json also on stdout), 2 usage, 130 interrupted."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check(parser, args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        done = _run(args)
    except SpurguardError as error:
        if args.json:
            print(json.dumps({"error": {"code": error.code, "message": str(error)}}), flush=True)
        print(f"spurguard fit: error: {error.code}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("spurguard fit: interrupted; the same command with the same --job-id resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(done, FitSummary):
        print(json.dumps(done.to_dict(), indent=2) if args.json else _summary_text(done), flush=True)
    else:
        print(json.dumps(done, indent=2) if args.json else
              f"shard {done['shard']}/{done['num_shards']} of fit {done['fit_id']} written: {done['images']} images, "
              f"{done['skipped_images']} skipped, {len(done['classes'])} class part(s); merge with --merge "
              f"{done['num_shards']} once all are", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
