"""The `spurguard` command line's arguments: their types, the parser and `--version`.

The integer options are bounded by the proto fields they fill, so a value out of range is a
usage error here, not protobuf's error when the request is built.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from spurguard.client.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from spurguard.client.cli.report import DEFAULT_TOP
from spurguard.client.client import DEFAULT_SCORE_BATCH, DEFAULT_TIMEOUT_S
from spurguard.vocab import (
    ATTACK_PARAMETERIZATIONS,
    HEATMAP_METHODS,
    IMAGE_SUFFIXES,
    LABELS,
    SPUFIX_MODES,
    SPURIOUS_DIRECTIONS,
)

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "SPURGUARD_SERVER"
TOKEN_ENV = "SPURGUARD_TOKEN"
CLASS_HELP = "class index or name (as in the model's classes.txt; see `spurguard models`)"
CLASSES_HELP = "indices or names, comma-separated"
# `spurguard ui`: components per class page, top images per component, live-label poll interval
UI_TOP = 10
UI_TOP_K = 6
UI_POLL_S = 0.5


_T = TypeVar("_T")


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
        pyproject = Path(__file__).resolve().parents[4] / "pyproject.toml"
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
--tls*, --token, --json and --timeout may be given before or after the command name. A server
started with --auth-tokens takes the token of --token, else ${TOKEN_ENV}: prefer the
variable (other users can see command lines), and TLS beyond loopback.

exit status:
  {EXIT_OK}    success
  {EXIT_ERROR}    a call failed; "spurguard: error: CODE: message" names the gRPC status (with
       --json, {{"error": {{"code": CODE, "message": …}}}} goes to stdout as well)
  {EXIT_USAGE}    usage error (or serve/demo/export-triton/health/fit --store without the spurguard[server] extra)
  {EXIT_PARTIAL}    score: some images failed (their lines carry the error); the rest were scored
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); a fit or transfer job keeps running on the server
"""


def _global_options(
    parser: argparse.ArgumentParser, server_default: str | None, token_default: str | None, for_command: bool
) -> None:
    """--server/--json/--timeout/--tls*/--token; on a command they default to SUPPRESS so the top
    level's stand."""
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
    parser.add_argument("--token", metavar="TOKEN", default=default(token_default),  # never shown in --help
                        help=f"bearer token for a server started with --auth-tokens (default: ${TOKEN_ENV})")


def split_command(argv: Sequence[str]) -> tuple[dict[str, object], str | None, list[str]]:
    """(the global options given before the command, the command's name, every argument after it),
    read without the commands' own parsers: what decides whether `fit` runs offline. A command
    line that does not parse here gives (empty, None, []), and the full parser reports it."""
    probe = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    _global_options(probe, None, None, for_command=True)  # SUPPRESS defaults: only what was given
    probe.add_argument("command", nargs="?")
    probe.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        args, _ = probe.parse_known_args(list(argv))
    except argparse.ArgumentError:
        return {}, None, []
    given = vars(args)
    command, rest = given.pop("command"), given.pop("rest")
    return given, command, rest


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
    parser.add_argument("--parameterization", choices=ATTACK_PARAMETERIZATIONS,
                        help="how the attack moves the image: every pixel (server default: pixel), a 4x coarser "
                             "grid upsampled (low_frequency), or every pixel under random shifts (jitter)")


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The whole command line; `environ` supplies the SPURGUARD_SERVER and SPURGUARD_TOKEN defaults."""
    server_default = environ.get(SERVER_ENV) or DEFAULT_SERVER
    token_default = environ.get(TOKEN_ENV) or None
    parser = argparse.ArgumentParser(
        prog="spurguard",
        description="Find and guard against harmful spurious features in image classifiers\n"
        "(Neuhaus et al., ICCV 2023), through a spurguard gRPC server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print `spurguard VERSION` and exit")
    _global_options(parser, server_default, token_default, for_command=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, server_default, token_default, for_command=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=description)
        sub.set_defaults(command_parser=sub)
        return sub

    for name, summary in (
        ("serve", "run the gRPC server (needs spurguard[server]); see `spurguard serve --help`"),
        ("demo", "run the whole method on the planted-spurious demo data (needs spurguard[server])"),
        ("export-triton", "write a Triton model repository for a model's backbone (needs spurguard[server]); "
                          "see `spurguard export-triton --help`"),
        ("health", "check a server's gRPC health once, exit 0 if SERVING (a container or Kubernetes probe; needs "
                   "spurguard[server]); see `spurguard health --help`"),
    ):
        # No options of ours: every argument after the name goes to the server's own parser.
        sub = commands.add_parser(name, add_help=False, help=summary)
        sub.set_defaults(command_parser=sub)

    command(
        "models",
        "list the server's models",
        "List the loaded models: classes, feature dimension, input size, backend, device and the "
        "classes the current fit covers.",
    )

    fit = command(
        "fit",
        "fit class-wise neural PCA components on a dataset",
        "Start a fit job on the server and follow its progress; prints the committed fit. The job "
        "runs on the server: Ctrl-C stops watching, not the job (unless --cancel-on-interrupt); "
        "follow it again with `spurguard watch JOB`. With --store DIR the fit runs in this process "
        "instead, with no server (needs spurguard[server]): the whole fit, one shard of a sharded fit "
        "(--shard I/N) or the merge of the shards (--merge N); see `spurguard fit --store DIR --help`.",
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
        help="name the job (letters, digits, - and _); an existing id re-attaches, a cancelled or "
        "interrupted one (its server was killed) with the same settings resumes",
    )
    fit.add_argument("--extend", action="store_true", help="add these classes to the current fit instead of starting a new one")
    fit.add_argument("--detach", action="store_true", help="print the job once the server has accepted it and return at once")
    fit.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job instead of leaving it running")

    watch = command(
        "watch",
        "follow a running fit or transfer job",
        "Re-attach to a fit or transfer job: its progress, then the committed fit or transfer (at once "
        "if it has finished).",
    )
    watch.add_argument("job_id", metavar="JOB", help="job id (see `spurguard jobs`)")
    watch.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job instead of leaving it running")

    jobs = command("jobs", "list fit and transfer jobs", "List running and recently finished fit and transfer jobs, newest first, also those of earlier server runs "
                   "(kept in the store; a job whose server was killed shows as failed, ABORTED).")
    jobs.add_argument("--model", metavar="NAME", help="only this model's jobs")

    cancel = command(
        "cancel",
        "cancel a fit or transfer job",
        "Ask a job to stop and print its state. Classes it finished are kept, so a later fit with "
        "the same --job-id (or transfer from the same labels) resumes; nothing is committed.",
    )
    cancel.add_argument("job_id", metavar="JOB", help="job id")

    components = command(
        "components",
        "show one class's components",
        "One class's neural PCA components in the current fit: eigenvalue, explained variance, alpha "
        "over the fit images (mean, floor = the q-th percentile, max) and the label.",
    )
    components.add_argument("--model", required=True, metavar="NAME", help="model name")
    components.add_argument("--class", dest="class_index", required=True, type=_class_ref, metavar="K", help=CLASS_HELP)
    components.add_argument("--top", type=_index, metavar="N", help="only the first N components (default and 0: all kept)")

    label = command(
        "label",
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

    ui = command(
        "ui",
        "open the labelling page in a browser (needs spurguard[ui])",
        "Serve a local web page to label components from: models, then classes with labelling progress, "
        "then one page per class with a row per component (statistics, top fit images with heatmaps and "
        "their colour scale, the feature attack as it streams, the label with its note, author and time, "
        "and its history). Label with buttons or keys (s spurious, n not spurious, i inconsistent, "
        "u unlabeled, j/k next/previous, / note); other labellers' changes appear as the server pushes them. It "
        "talks to --server only through the gRPC API, with --token (role label to label; score only reads). "
        "Ctrl-C stops it.",
    )
    ui.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                    help="address the page listens on (default 127.0.0.1: this machine only; the page acts "
                         "with your token, so keep it local). It answers only requests addressed to this name "
                         "(and loopback's): with 0.0.0.0 that is loopback alone, against DNS rebinding")
    ui.add_argument("--port", type=_int_between(0, 65535), default=8080, metavar="PORT",
                    help="port of the page (default 8080; 0: any free one)")
    ui.add_argument("--top", type=_count, default=UI_TOP, metavar="N",
                    help=f"components per class page, from index 0 (default {UI_TOP})")
    ui.add_argument("--top-k", type=_count, default=UI_TOP_K, metavar="N",
                    help=f"top fit images per component (default {UI_TOP_K})")
    ui.add_argument("--steps", type=_count, metavar="N", help="feature attack steps (server default: 200)")
    ui.add_argument("--heatmap", choices=[m for m in HEATMAP_METHODS if m != "none"],
                    help="heatmap method (server default: grad_cam)")
    ui.add_argument("--poll-s", type=_positive_float, default=UI_POLL_S, metavar="SECONDS",
                    help="how soon a class page's lost label watch (WatchLabels) is opened again, and how often "
                         f"it reads the labels from a server that cannot push them (default {UI_POLL_S:g})")

    score = command(
        "score",
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
    evaluate.add_argument(
        "--directions",
        choices=SPURIOUS_DIRECTIONS,
        help="spurious directions SpuFix removes: the model's own labels, the transferred ones "
        "(`spurguard transfer`), or both (default: both, what score applies); the result lists them",
    )
    evaluate.add_argument("--transfer", dest="directions", action="store_const", const="transferred",
                          help="short for --directions transferred")

    transfer = command(
        "transfer",
        "carry a model's spurious labels to another model (max_cov)",
        "Carry the spurious labels of --from's current fit to the model --to served by the same "
        "server (SPEC §1 transfer, the paper's max_cov): over the source fit's images, read again "
        "through --to's preprocessing, each labelled component becomes the direction of --to's "
        "activations that covaries most with it. From then on --to's score, evaluate and SpuFix "
        "apply those directions besides its own labels (score's components name their source); "
        "re-labelling --from changes nothing there until the next transfer. A job like fit: "
        "Ctrl-C stops watching, not the job (unless --cancel-on-interrupt); the same transfer "
        "again resumes a cancelled one, or re-applies a finished one at once.",
    )
    transfer.add_argument("--from", dest="source", required=True, metavar="MODEL", help="the model whose labels are carried")
    transfer.add_argument("--to", dest="target", required=True, metavar="MODEL", help="the model that gets them")
    transfer.add_argument("--classes", type=_class_list, default=[], metavar="K,K,…",
                          help=f"classes to transfer (default: every class with spurious labels); {CLASSES_HELP}")
    transfer.add_argument("--batch-size", type=_count, metavar="N", help="images per forward pass (default: the target's max batch size)")
    transfer.add_argument("--job-id", metavar="ID", help="name the job (letters, digits, - and _); an existing id re-attaches")
    transfer.add_argument("--detach", action="store_true", help="print the job once the server has accepted it and return at once")
    transfer.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job instead of leaving it running")
    return parser


