"""The `spurguard` command line: a front over the thin client (SPEC section 3).

Only grpcio, protobuf, numpy and the standard library are imported here, so the CLI works from
`pip install spurguard` without the server extra; `serve` and `demo` import the server lazily.
Each command is one small function of (parsed args, client); the client comes from a factory
that tests replace, and every output shape is built by the pure functions of `cli_format`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import grpc

from spurguard import vocab as t
from spurguard.client import cli_format as fmt
from spurguard.client.cli_progress import Progress, evaluate_line, fit_line, score_line, visualize_line
from spurguard.client.cli_visualize import VisualizeWriter
from spurguard.client.client import (
    DEFAULT_SCORE_BATCH,
    DEFAULT_TIMEOUT_S,
    Client,
    SpurguardClientError,
    tls_credentials,
)
from spurguard.client.report import DEFAULT_TOP, write_report
from spurguard.vocab import HEATMAP_METHODS, IMAGE_SUFFIXES, LABELS, SPUFIX_MODES

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "SPURGUARD_SERVER"
CLASS_HELP = "class index or name (as in the model's classes.txt; see `spurguard models`)"
CLASSES_HELP = "indices or names, comma-separated"

EXIT_OK = 0
EXIT_ERROR = 1  # a call failed: the server's status code is printed
EXIT_USAGE = 2  # bad arguments (argparse or the client's checks), or the server extra missing for serve/demo
EXIT_PARTIAL = 3  # score: some images failed, the others were printed
EXIT_INTERRUPTED = 130  # Ctrl-C

# Commands whose arguments belong to another program: everything after the name is passed on.
FORWARDED = {
    "serve": "spurguard.server.rpc.app",
    "demo": "spurguard.server.demo.__main__",
}

_T = TypeVar("_T")
ClientFactory = Callable[[str, float | None, grpc.ChannelCredentials | None], Client]
Handler = Callable[[argparse.Namespace, Client], int]


class CliError(Exception):
    """A failure on the client's side (not a server status): printed as one line, exit 1.

    `code` is the gRPC status that describes it best, for the --json error document.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code


class UsageError(Exception):
    """Arguments that argparse cannot check alone (e.g. an empty image folder): exit 2."""


def connect(target: str, timeout: float | None, credentials: grpc.ChannelCredentials | None) -> Client:
    return Client(target, timeout=timeout, credentials=credentials)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"cannot read the {what} {path}: {error.strerror or error}") from None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS from --tls / --tls-ca / --tls-cert / --tls-key (any of them turns it on); None: plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key (a client certificate and its key), or neither")
    return tls_credentials(
        ca=_read(args.tls_ca, "CA certificate") if args.tls_ca else None,
        cert=_read(args.tls_cert, "client certificate") if args.tls_cert else None,
        key=_read(args.tls_key, "client key") if args.tls_key else None,
    )


# ---- argument types ----


# The proto fields the integer options fill: a value beyond its field's range is a usage error
# here rather than protobuf's ValueError when the request is built.
INT32_MAX = 2**31 - 1  # class indices
UINT32_MAX = 2**32 - 1  # counts and component indices
UINT64_MAX = 2**64 - 1  # the attack seed


def _int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


_class_index = _int_between(0, INT32_MAX)
_index = _int_between(0, UINT32_MAX)
_count = _int_between(1, UINT32_MAX)
_seed = _int_between(0, UINT64_MAX)


def _comma_list(item: Callable[[str], _T], example: str) -> Callable[[str], list[_T]]:
    """Comma-separated values of one type, e.g. "0,3,7"."""

    def parse(text: str) -> list[_T]:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated values like {example}; got {text!r}")
        return [item(part) for part in parts]

    return parse


def _class_ref(text: str) -> int | str:
    """A class index, or a class name that `resolve_classes` looks up once the client is connected."""
    ref = text.strip()
    if not ref:
        raise argparse.ArgumentTypeError("expected a class index or name, got nothing")
    try:
        int(ref)
    except ValueError:
        return ref
    return _class_index(ref)


_class_list = _comma_list(_class_ref, "0,3,7 or 0,star")
_index_list = _comma_list(_index, "0,3,7")


def _float_at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float_at_least_zero(text)
    if value == 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


# ---- parser ----


def version() -> str:
    """The installed distribution's version; from a source checkout, the one pyproject.toml declares."""
    try:
        return importlib.metadata.version("spurguard")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


class _VersionAction(argparse.Action):
    """`--version`: looks the version up only when asked, not on every run (a metadata scan)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"spurguard {version()}")
        parser.exit()


_EPILOG = f"""\
The server address comes from --server, else ${SERVER_ENV}, else {DEFAULT_SERVER}. --server,
--tls*, --json and --timeout may be given before or after the command name.

exit status:
  {EXIT_OK}    success
  {EXIT_ERROR}    a call failed; "spurguard: error: CODE: message" names the gRPC status (with
       --json, {{"error": {{"code": CODE, "message": …}}}} goes to stdout as well)
  {EXIT_USAGE}    usage error (or serve/demo without the spurguard[server] extra)
  {EXIT_PARTIAL}    score: some images failed (their lines carry the error); the rest were scored
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); a fit job keeps running on the server
"""


def _global_options(parser: argparse.ArgumentParser, server_default: str | None, for_command: bool) -> None:
    """--server/--json/--timeout; on a command they default to SUPPRESS so the top level's stand."""
    suppress = argparse.SUPPRESS

    def default(value: object) -> object:
        return suppress if for_command else value

    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(server_default),
        help=f"server address (default: ${SERVER_ENV}, else {DEFAULT_SERVER}; now {server_default})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output on stdout (one JSON document, or JSON lines for score); "
        "progress still goes to stderr",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_float_at_least_zero,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of each request/response call, retries included (default {DEFAULT_TIMEOUT_S:g}; "
        "0: none); streams (fit, watch, visualize, evaluate) have none",
    )
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect with TLS, trusting the system's CAs (implied by the --tls-* options)")
    parser.add_argument("--tls-ca", metavar="PEM", default=default(None), help="trust this CA certificate for the server")
    parser.add_argument("--tls-cert", metavar="PEM", default=default(None),
                        help="this client's certificate, for servers that require one (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", default=default(None), help="the private key of --tls-cert")


def _add_view_arguments(parser: argparse.ArgumentParser) -> None:
    """What visualize and report share: how hard to attack, how many top images, which heatmaps."""
    parser.add_argument("--steps", type=_count, metavar="N", help="attack steps (server default: 200)")
    parser.add_argument("--eps", type=_positive_float, metavar="E", help="L2 radius in [0,1] pixel units (server default: 30 at 224 px; at most sqrt(3) * side / 2, gray to the box's corner)")
    parser.add_argument("--top-k", type=_count, metavar="N", help="top fit images per component (server default: 8)")
    parser.add_argument("--heatmap", choices=HEATMAP_METHODS,
                        help="heatmap method (server default: grad_cam, or integrated_gradients where the "
                             "model's layers cannot be hooked)")
    parser.add_argument("--heatmap-layer", metavar="NAME",
                        help="the feature map Grad-CAM uses, a submodule name such as layer4 (default: the "
                             "backbone's last spatial one)")


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The whole command line; `environ` supplies the SPURGUARD_SERVER default."""
    server_default = environ.get(SERVER_ENV) or DEFAULT_SERVER
    parser = argparse.ArgumentParser(
        prog="spurguard",
        description="Find and guard against harmful spurious features in image classifiers\n"
        "(Neuhaus et al., ICCV 2023), through a spurguard gRPC server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print `spurguard VERSION` and exit")
    _global_options(parser, server_default, for_command=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, server_default, for_command=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=description)
        sub.set_defaults(handler=handler, command_parser=sub)
        return sub

    for name, summary in (
        ("serve", "run the gRPC server (needs spurguard[server]); see `spurguard serve --help`"),
        ("demo", "run the whole method on the planted-spurious demo data (needs spurguard[server])"),
    ):
        # No options of ours: every argument after the name goes to the server's own parser.
        sub = commands.add_parser(name, add_help=False, help=summary)
        sub.set_defaults(command_parser=sub)

    command(
        "models",
        cmd_models,
        "list the server's models",
        "List the loaded models: classes, feature dimension, input size, backend, device and the "
        "classes the current fit covers.",
    )

    fit = command(
        "fit",
        cmd_fit,
        "fit class-wise neural PCA components on a dataset",
        "Start a fit job on the server and follow its progress; prints the committed fit. The job "
        "runs on the server: Ctrl-C stops watching, not the job (unless --cancel-on-interrupt); "
        "follow it again with `spurguard watch JOB`.",
    )
    fit.add_argument("--model", required=True, metavar="NAME", help="model name (see `spurguard models`)")
    fit.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="image folder ON THE SERVER, laid out DIR/<class>/<image>: absolute, or relative to one "
        "of the server's --data-root folders",
    )
    fit.add_argument("--classes", type=_class_list, default=[], metavar="K,K,…", help=f"classes to fit (default: every class with images); {CLASSES_HELP}")
    fit.add_argument("--components", type=_count, metavar="N", help="components kept per class (server default: 50)")
    fit.add_argument("--batch-size", type=_count, metavar="N", help="images per forward pass (default: the model's max batch size)")
    fit.add_argument(
        "--job-id",
        metavar="ID",
        help="name the job (letters, digits, - and _); an existing id re-attaches, an unfinished "
        "cancelled one with the same settings resumes",
    )
    fit.add_argument("--extend", action="store_true", help="add these classes to the current fit instead of starting a new one")
    fit.add_argument("--detach", action="store_true", help="print the job once the server has accepted it and return at once")
    fit.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job instead of leaving it running")

    watch = command(
        "watch",
        cmd_watch,
        "follow a running fit job",
        "Re-attach to a fit job: its progress, then the committed fit (at once if it has finished).",
    )
    watch.add_argument("job_id", metavar="JOB", help="job id (see `spurguard jobs`)")
    watch.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job instead of leaving it running")

    jobs = command("jobs", cmd_jobs, "list fit jobs", "List running and recently finished fit jobs, newest first.")
    jobs.add_argument("--model", metavar="NAME", help="only this model's jobs")

    cancel = command(
        "cancel",
        cmd_cancel,
        "cancel a fit job",
        "Ask a fit job to stop and print its state. Classes it finished are kept, so a later fit "
        "with the same --job-id resumes; no fit is committed.",
    )
    cancel.add_argument("job_id", metavar="JOB", help="job id")

    components = command(
        "components",
        cmd_components,
        "show one class's components",
        "One class's neural PCA components in the current fit: eigenvalue, explained variance, alpha "
        "over the fit images (mean, floor = the q-th percentile, max) and the label.",
    )
    components.add_argument("--model", required=True, metavar="NAME", help="model name")
    components.add_argument("--class", dest="class_index", required=True, type=_class_ref, metavar="K", help=CLASS_HELP)
    components.add_argument("--top", type=_index, metavar="N", help="only the first N components (default and 0: all kept)")

    label = command(
        "label",
        cmd_label,
        "label a component",
        "Record a human verdict on one component of the current fit. SpuFix and score's "
        "spurious evidence use the components labelled spurious; unlabeled clears a label.",
    )
    label.add_argument("--model", required=True, metavar="NAME", help="model name")
    label.add_argument("--class", dest="class_index", required=True, type=_class_ref, metavar="K", help=CLASS_HELP)
    label.add_argument("--component", required=True, type=_index, metavar="L", help="component index (0 = largest eigenvalue)")
    label.add_argument("--as", dest="label", required=True, choices=LABELS, help="the verdict")
    label.add_argument("--note", default="", metavar="TEXT", help="why (kept with the label)")

    visualize = command(
        "visualize",
        cmd_visualize,
        "render what a component responds to",
        "Stream a component's top fit images, their heatmaps, the feature attack (from gray, L2 "
        "bounded) and its final image, writing the PNGs under --out as "
        "class_<K>/component_<L>/{top_<rank>,heatmap_<rank>,frame_<step>,attack}.png.",
    )
    visualize.add_argument("--model", required=True, metavar="NAME", help="model name")
    visualize.add_argument("--class", dest="class_index", required=True, type=_class_ref, metavar="K", help=CLASS_HELP)
    visualize.add_argument(
        "--component",
        required=True,
        type=_index_list,
        action="extend",
        metavar="L[,L…]",
        help="component index; repeat or comma-separate for several",
    )
    visualize.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the PNGs (created)")
    _add_view_arguments(visualize)
    visualize.add_argument("--frame-every", type=_index, metavar="N", help="an attack frame every N steps (default steps/10; 0: none)")
    visualize.add_argument("--seed", type=_seed, metavar="S", help="attack randomness (default 0: deterministic)")

    report = command(
        "report",
        cmd_report,
        "write HTML pages to label components from",
        "For each fitted class (or only --class K): the first --top components of the current fit, "
        "each with its statistics (explained variance, alpha mean/floor/max), top fit images with "
        "their heatmaps, the feature attack's image (alpha start -> final, p(k|x)), its current label "
        "and the `spurguard label` command to set one. Writes DIR/index.html (the classes, with label "
        "counts) and DIR/class_<K>.html, with the PNGs under DIR/class_<K>/component_<L>/ (relative "
        "links, inline CSS: the folder can be moved and opened offline). One Visualize call per class "
        "(per 16 components); progress goes to stderr; --json prints {index, classes: [{class, page, "
        "components}]}.",
    )
    report.add_argument("--model", required=True, metavar="NAME", help="model name")
    report.add_argument("--class", dest="class_index", type=_class_ref, metavar="K", help=f"only this class (default: every fitted class); {CLASS_HELP}")
    report.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the pages and PNGs (created)")
    report.add_argument("--top", type=_count, default=DEFAULT_TOP, metavar="N", help=f"components per class, from index 0 (default {DEFAULT_TOP})")
    _add_view_arguments(report)

    score = command(
        "score",
        cmd_score,
        "score images: predictions, spurious evidence, SpuFix",
        "Score local images (read here, sent to the server) with a model: top-5 predictions, the "
        "analysed class's decomposition into components, spurious evidence (spurious_alpha, "
        "trigger) and the prediction after SpuFix. "
        f"A folder stands for its image files ({', '.join(IMAGE_SUFFIXES)}, recursively, sorted, "
        f"hidden ones skipped). An image that fails gets an error line and the exit status is "
        f"{EXIT_PARTIAL}; the others are still scored.",
    )
    score.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    score.add_argument("--model", required=True, metavar="NAME", help="model name")
    score.add_argument("--class", dest="class_index", type=_class_ref, metavar="K", help=f"class to analyse (default: each image's top-1); {CLASS_HELP}")
    score.add_argument("--top", type=_index, metavar="N", help="components reported, largest alpha first (server default: 5; 0: every kept one); the class's spurious-labelled ones are added")
    score.add_argument("--spufix", choices=SPUFIX_MODES, help="SpuFix mode for spufix and trigger (default: the server's)")
    score.add_argument(
        "--batch-size",
        type=_count,
        default=DEFAULT_SCORE_BATCH,
        metavar="N",
        help=f"images per request (default {DEFAULT_SCORE_BATCH}); results are printed per request",
    )

    evaluate = command(
        "evaluate",
        cmd_evaluate,
        "spurious score benchmark, without and with SpuFix",
        "Per class: ROC AUC and average precision of p(k|x), clean images of k against images "
        "with k's spurious feature only, mean p(k|x) and the share predicted k on both sets; "
        "without and with SpuFix.",
    )
    evaluate.add_argument("--model", required=True, metavar="NAME", help="model name")
    evaluate.add_argument("--clean", required=True, metavar="DIR", help="clean image folder ON THE SERVER (DIR/<class>/<image>)")
    evaluate.add_argument(
        "--spurious",
        required=True,
        metavar="DIR",
        help="spurious folder ON THE SERVER in the Spurious ImageNet layout (spurious_imagenet_<class>_…_<component>)",
    )
    evaluate.add_argument("--spufix", choices=SPUFIX_MODES, help="SpuFix mode (default: the server's)")
    evaluate.add_argument("--classes", type=_class_list, default=[], metavar="K,K,…", help=f"classes to evaluate (default: every class with spurious images); {CLASSES_HELP}")
    evaluate.add_argument("--batch-size", type=_count, metavar="N", help="images per forward pass (default: the model's max batch size)")
    return parser


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
    classes = client.get_model(args.model).classes
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
                f"model {args.model} has no class named {ref!r}; its classes: {fmt.class_names(classes, shown=5)} "
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


def _interrupted(args: argparse.Namespace, client: Client, job_id: str | None) -> int:
    """Ctrl-C while following a job: say where the job stands, cancel it only if asked to."""
    server = _server_option(args)
    if job_id is None:
        message = (
            "interrupted before the server named the job; if it started, it keeps running "
            f"(see `spurguard {server}jobs`)"
        )
    elif args.cancel_on_interrupt:
        job = client.cancel_job(job_id)
        message = f"interrupted; cancel requested for fit job {job_id} (state: {job.state})"
    else:
        message = (
            f"interrupted; fit job {job_id} continues on the server. Follow it with "
            f"`spurguard {server}watch {job_id}`, cancel it with `spurguard {server}cancel {job_id}`"
        )
    print(f"spurguard: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _follow(args: argparse.Namespace, client: Client, updates: Iterator[t.FitUpdate], job_id: str | None) -> int:
    """Show a fit stream's progress, then print its summary."""
    progress = _progress(args)
    summary: t.FitSummary | None = None
    after = "cancels the job" if args.cancel_on_interrupt else "stops watching; the job keeps running"
    try:
        for number, update in enumerate(updates):
            job_id = update.job_id
            if number == 0:
                progress.message(f"following fit job {job_id} on {args.server} (Ctrl-C {after})")
            if isinstance(update, t.FitSummary):
                summary = update
            else:
                progress.update(fit_line(update), key=update.phase)
    except KeyboardInterrupt:
        progress.close()  # before the message, so it starts on its own line
        return _interrupted(args, client, job_id)
    finally:
        progress.close()
    if summary is None:
        raise CliError(f"the server ended fit job {job_id}'s stream without a summary", grpc.StatusCode.INTERNAL)
    _print(fmt.json_document(summary) if args.json else fmt.fit_summary_table(summary))
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
    if not args.detach:
        return _follow(args, client, updates, args.job_id)
    first = next(updates, None)  # the first update names the job; leaving the stream does not stop it
    if first is None:
        raise CliError("the server ended the fit stream before naming the job", grpc.StatusCode.INTERNAL)
    job = client.get_job(first.job_id)
    if args.json:
        _print(fmt.json_document(job))
    else:
        _print(f"fit job {job.job_id}: {job.state}; follow it with `spurguard {_server_option(args)}watch {job.job_id}`")
    return EXIT_OK


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


def _os_error_code(error: OSError) -> grpc.StatusCode:
    """The status a local file error would have had from the server."""
    if isinstance(error, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNKNOWN


def _unreadable(path: str, error: OSError) -> t.ScoreResult:
    """A result line for a file the CLI itself could not read."""
    reason = error.strerror or str(error)
    return t.ScoreResult.failed(path, _os_error_code(error).name, f"cannot read {path}: {reason}")


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


# ---- entry point ----


def _forward(command: str, argv: list[str]) -> int:
    """Run a server-side program (serve, demo) with the remaining arguments."""
    try:
        module = importlib.import_module(FORWARDED[command])
    except ImportError as error:
        print(
            f"spurguard: error: `spurguard {command}` needs the server ({error}); "
            "install it with: pip install 'spurguard[server]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    status = module.main(argv)
    return EXIT_OK if status is None else int(status)


def _failed(args: argparse.Namespace, code: grpc.StatusCode, message: str, line: str) -> int:
    """A failed command: `line` on stderr and, with --json, SPEC section 3's error document on
    stdout too, so that a script reading stdout sees the failure and its code."""
    if args.json:
        _print(fmt.json_document({"error": t.ErrorStatus(code.name, message)}))
    print(f"spurguard: error: {line}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory = connect) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command and return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in FORWARDED:
        return _forward(args.command, extra)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with closing(client_factory(args.server, args.timeout or None, channel_credentials(args))) as client:
            resolve_classes(args, client)
            return int(args.handler(args, client))
    except SpurguardClientError as error:
        where = f" (server {args.server})" if error.code == grpc.StatusCode.UNAVAILABLE else ""
        message = f"{' '.join(error.details.split())}{where}"
        return _failed(args, error.code, message, f"{error.code.name}: {message}")
    except (UsageError, ValueError) as error:  # the client raises ValueError for arguments it cannot send
        args.command_parser.error(str(error))
    except KeyboardInterrupt:
        print("spurguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `spurguard score --json … | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except CliError as error:
        return _failed(args, error.code, str(error), str(error))
    except OSError as error:
        return _failed(args, _os_error_code(error), str(error), str(error))
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
