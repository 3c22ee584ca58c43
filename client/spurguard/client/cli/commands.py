"""The `spurguard` commands: one function of (parsed arguments, client) each, in `COMMANDS`.

Every output shape comes from `format` (tables) and the vocabulary (`--json`); progress goes to
stderr through `progress`.
"""
from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from spurguard import vocab as t
from spurguard.client.cli import format as fmt
from spurguard.client.cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, CliError, UsageError
from spurguard.client.cli.parser import DEFAULT_SERVER
from spurguard.client.cli.progress import Progress, evaluate_line, fit_line, score_line, visualize_line
from spurguard.client.cli.report import write_report
from spurguard.client.cli.visualize import VisualizeWriter
from spurguard.client.client import Client
from spurguard.vocab import IMAGE_SUFFIXES

Handler = Callable[[argparse.Namespace, Client], int]


# ---- helpers ----


def _progress(args: argparse.Namespace) -> Progress:
    """A redrawn line on a terminal; plain periodic lines otherwise, none of those with --json."""
    if sys.stderr.isatty():
        mode = "tty"
    else:
        mode = "off" if args.json else "plain"
    return Progress(sys.stderr, mode)


def _server_option(args: argparse.Namespace) -> str:
    """`--server X ` (and the TLS options) for hints, when they are not the defaults."""
    options = [] if args.server == DEFAULT_SERVER else ["--server", args.server]
    options += ["--tls"] if args.tls and not (args.tls_ca or args.tls_cert) else []
    for flag, value in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        options += [flag, value] if value else []
    return "".join(f"{shlex.quote(option)} " for option in options)


def _print(text: str) -> None:
    print(text, flush=True)


# ---- commands ----


def resolve_classes(args: argparse.Namespace, client: Client) -> None:
    """Class names in --class / --classes become indices, asking the server for the model's
    classes (GetModel) only when a name was given: indices alone cost no extra call."""
    single: int | str | None = getattr(args, "class_index", None)
    many: list[int | str] = getattr(args, "classes", [])
    if not any(isinstance(ref, str) for ref in [single, *many]):
        return
    model = getattr(args, "source", None) or args.model  # a transfer's classes are the source's
    classes = client.get_model(model).classes
    exact: dict[str, int] = {}
    loose: dict[str, int] = {}  # as the server matches class folders: any case, "_" for " "
    for info in classes:
        for key in filter(None, (info.name, info.wnid)):
            exact.setdefault(key, info.index)
            loose.setdefault(key.lower().replace(" ", "_"), info.index)

    def index(ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        found = exact.get(ref, loose.get(ref.lower().replace(" ", "_")))
        if found is None:
            raise UsageError(
                f"model {model} has no class named {ref!r}; its classes: {fmt.class_names(classes, shown=5)} "
                "(or give the index)"
            )
        return found

    if single is not None:
        args.class_index = index(single)
    if many:
        args.classes = [index(ref) for ref in many]


def cmd_models(args: argparse.Namespace, client: Client) -> int:
    models = [client.get_model(m.name) for m in client.list_models()]  # ListModels sends no class names
    _print(fmt.json_document(models) if args.json else fmt.models_table(models))
    return EXIT_OK


def _interrupted(args: argparse.Namespace, client: Client, job_id: str | None, kind: str) -> int:
    """Ctrl-C while following a job: say where the job stands, cancel it only if asked to."""
    server = _server_option(args)
    if job_id is None:
        message = (
            "interrupted before the server named the job; if it started, it keeps running "
            f"(see `spurguard {server}jobs`)"
        )
    elif args.cancel_on_interrupt:
        job = client.cancel_job(job_id)
        message = f"interrupted; cancel requested for {kind} {job_id} (state: {job.state})"
    else:
        message = (
            f"interrupted; {kind} {job_id} continues on the server. Follow it with "
            f"`spurguard {server}watch {job_id}`, cancel it with `spurguard {server}cancel {job_id}`"
        )
    print(f"spurguard: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _follow(
    args: argparse.Namespace, client: Client, updates: Iterator[t.FitUpdate], job_id: str | None, kind: str = "job"
) -> int:
    """Show a job stream's progress, then print its summary (a fit's or a transfer's); `kind`
    names the job in messages ("fit job", "transfer job", or "job" when watching any)."""
    progress = _progress(args)
    summary: t.FitSummary | t.TransferSummary | None = None
    after = "cancels the job" if args.cancel_on_interrupt else "stops watching; the job keeps running"
    try:
        for number, update in enumerate(updates):
            job_id = update.job_id
            if number == 0:
                progress.message(f"following {kind} {job_id} on {args.server} (Ctrl-C {after})")
            if isinstance(update, t.FitProgress):
                progress.update(fit_line(update), key=update.phase)
            else:
                summary = update
    except KeyboardInterrupt:
        progress.close()  # before the message, so it starts on its own line
        return _interrupted(args, client, job_id, kind)
    finally:
        progress.close()
    if summary is None:
        raise CliError(f"the server ended {kind} {job_id}'s stream without a summary", grpc.StatusCode.INTERNAL)
    if args.json:
        _print(fmt.json_document(summary))
    else:
        _print(fmt.fit_summary_table(summary) if isinstance(summary, t.FitSummary) else fmt.transfer_summary_table(summary))
    return EXIT_OK


def _start_job(args: argparse.Namespace, client: Client, updates: Iterator[t.FitUpdate], kind: str) -> int:
    """Follow a job just asked for, or with --detach print it once the server has named it."""
    if not args.detach:
        return _follow(args, client, updates, args.job_id, kind)
    first = next(updates, None)  # the first update names the job; leaving the stream does not stop it
    if first is None:
        raise CliError(f"the server ended the {kind} stream before naming the job", grpc.StatusCode.INTERNAL)
    job = client.get_job(first.job_id)
    if args.json:
        _print(fmt.json_document(job))
    else:
        _print(f"{kind} {job.job_id}: {job.state}; follow it with `spurguard {_server_option(args)}watch {job.job_id}`")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace, client: Client) -> int:
    updates = client.fit(
        args.model,
        args.data,
        classes=args.classes,
        num_components=args.components,
        batch_size=args.batch_size,
        job_id=args.job_id,
        extend=args.extend,
    )
    return _start_job(args, client, updates, "fit job")


def cmd_transfer(args: argparse.Namespace, client: Client) -> int:
    updates = client.transfer(args.source, args.target, classes=args.classes, batch_size=args.batch_size,
                              job_id=args.job_id)
    return _start_job(args, client, updates, "transfer job")  # type: ignore[arg-type]


def cmd_watch(args: argparse.Namespace, client: Client) -> int:
    return _follow(args, client, client.watch_job(args.job_id), args.job_id)


def cmd_jobs(args: argparse.Namespace, client: Client) -> int:
    jobs = client.list_jobs(args.model)
    _print(fmt.json_document(jobs) if args.json else fmt.jobs_table(jobs))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel_job(args.job_id)
    _print(fmt.json_document(job) if args.json else fmt.jobs_table([job]))
    return EXIT_OK


def cmd_components(args: argparse.Namespace, client: Client) -> int:
    components = client.get_components(args.model, args.class_index, top=args.top)
    _print(fmt.json_document(components) if args.json else fmt.components_table(components))
    return EXIT_OK


def cmd_label(args: argparse.Namespace, client: Client) -> int:
    record = client.label(args.model, args.class_index, args.component, args.label, note=args.note)
    _print(fmt.json_document(record) if args.json else fmt.label_line(record))
    return EXIT_OK


def cmd_visualize(args: argparse.Namespace, client: Client) -> int:
    writer = VisualizeWriter(args.out, args.class_index)
    progress = _progress(args)
    updates = client.visualize(
        args.model,
        args.class_index,
        args.component,
        steps=args.steps,
        eps=args.eps,
        frame_every=args.frame_every,
        top_k=args.top_k,
        seed=args.seed,
        heatmap=args.heatmap,
        heatmap_layer=args.heatmap_layer,
        parameterization=args.parameterization,
    )
    try:
        for update in updates:
            writer.add(update)
            progress.update(visualize_line(update), key=f"{update.component}:{type(update).__name__}")
    finally:
        progress.close()
    summary = writer.summary(args.model)
    _print(fmt.json_document(summary) if args.json else fmt.visualize_table(summary))
    return EXIT_OK


def cmd_report(args: argparse.Namespace, client: Client) -> int:
    info = client.get_model(args.model)
    if info.fit_id is None:
        raise CliError(f"model {args.model} has no fit to report; run `spurguard fit` first")
    classes = list(info.fitted_classes) if args.class_index is None else [args.class_index]
    progress = _progress(args)
    try:
        document = write_report(
            client,
            info,
            args.out,
            classes,
            top=args.top,
            steps=args.steps,
            eps=args.eps,
            top_k=args.top_k,
            heatmap=args.heatmap,
            heatmap_layer=args.heatmap_layer,
            parameterization=args.parameterization,
            server_option=_server_option(args),
            progress=progress.update,
        )
    finally:
        progress.close()
    pages = len(document["classes"])
    _print(fmt.json_document(document) if args.json else f"report of model {args.model}: {document['index']} ({pages} class pages)")
    return EXIT_OK


def expand_images(arguments: Sequence[str]) -> list[str]:
    """Image paths from the command line: a folder becomes its image files, recursively, sorted.

    Files and folders whose names start with "." below a given folder are skipped. A path that
    does not exist is kept: it fails on its own line, not the whole call.
    """
    paths: list[str] = []
    for argument in arguments:
        if not os.path.isdir(argument):
            paths.append(argument)
            continue
        root = Path(argument)
        found = sorted(
            path
            for path in root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
            and path.is_file()
        )
        if not found:
            raise UsageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {argument}")
        paths.extend(str(path) for path in found)
    return paths


def os_error_code(error: OSError) -> grpc.StatusCode:
    """The status a local file error would have had from the server."""
    if isinstance(error, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNKNOWN


def _unreadable(path: str, error: OSError) -> t.ScoreResult:
    """A result line for a file the CLI itself could not read."""
    reason = error.strerror or str(error)
    return t.ScoreResult.failed(path, os_error_code(error).name, f"cannot read {path}: {reason}")


def _score_batch(args: argparse.Namespace, client: Client, paths: Sequence[str]) -> list[t.ScoreResult]:
    """Read and score one batch of files, keeping input order; unreadable files fail alone."""
    local: dict[int, t.ScoreResult] = {}
    items: list[tuple[str, bytes]] = []
    for position, path in enumerate(paths):
        try:
            items.append((path, Path(path).read_bytes()))
        except OSError as error:
            local[position] = _unreadable(path, error)
    scored = iter(
        client.score(
            args.model,
            items,
            class_index=args.class_index,
            top=args.top,
            spufix=args.spufix,
            batch_size=args.batch_size,
        )
        if items
        else ()
    )
    return [local[position] if position in local else next(scored) for position in range(len(paths))]


def cmd_score(args: argparse.Namespace, client: Client) -> int:
    paths = expand_images(args.images)
    progress = _progress(args)
    results: list[t.ScoreResult] = []
    failed = 0
    started = time.monotonic()
    try:
        for start in range(0, len(paths), args.batch_size):
            batch = _score_batch(args, client, paths[start : start + args.batch_size])
            failed += sum(result.error is not None for result in batch)
            if args.json:
                _print("\n".join(fmt.json_line(result) for result in batch))
            else:
                results.extend(batch)
            progress.update(score_line(start + len(batch), len(paths), time.monotonic() - started))
    finally:
        progress.close()
    if not args.json:
        _print(fmt.score_table(results))
        for result in results:
            if result.error is not None:
                print(f"spurguard: {result.image_id}: {result.error.code}: {result.error.message}", file=sys.stderr)
    if failed:
        print(f"spurguard: {failed} of {len(paths)} images failed", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, client: Client) -> int:
    progress = _progress(args)
    updates = client.evaluate(
        args.model,
        args.clean,
        args.spurious,
        spufix=args.spufix,
        classes=args.classes,
        batch_size=args.batch_size,
        directions=args.directions,
    )
    result: t.EvaluateResult | None = None
    try:
        for update in updates:
            if isinstance(update, t.EvaluateResult):
                result = update
            else:
                progress.update(evaluate_line(update), key=update.phase)
    finally:
        progress.close()
    if result is None:
        raise CliError("the server ended the evaluate stream without a result", grpc.StatusCode.INTERNAL)
    _print(fmt.json_document(result) if args.json else fmt.evaluate_table(result))
    return EXIT_OK


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_ui(args: argparse.Namespace, client: Client) -> int:
    """The labelling page (spurguard.ui, the [ui] extra), in the foreground until Ctrl-C."""
    try:
        server = importlib.import_module("spurguard.ui.server")
    except ImportError as error:
        raise UsageError(f"`spurguard ui` needs the web page's packages ({error}); "
                         "install them with: pip install 'spurguard[ui]'") from None
    settings = server.UiSettings(args.host, args.port, args.top, args.top_k, args.steps, args.heatmap, args.poll_s)
    try:
        page = server.UiServer(client, settings)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    if not _is_loopback(args.host):
        print(f"spurguard ui: warning: listening on {args.host}: whoever reaches this port labels with your token "
              "(plain HTTP, no login); keep it on 127.0.0.1 unless a proxy in front checks who calls",
              file=sys.stderr)
    page.run(lambda: print(f"spurguard ui: open {page.url} (labelling on {client.target}; Ctrl-C stops)",
                           file=sys.stderr, flush=True))
    return EXIT_OK


COMMANDS: dict[str, Handler] = {
    "models": cmd_models,
    "fit": cmd_fit,
    "watch": cmd_watch,
    "jobs": cmd_jobs,
    "cancel": cmd_cancel,
    "components": cmd_components,
    "label": cmd_label,
    "visualize": cmd_visualize,
    "report": cmd_report,
    "score": cmd_score,
    "evaluate": cmd_evaluate,
    "transfer": cmd_transfer,
    "ui": cmd_ui,
}
