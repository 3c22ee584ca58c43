"""`spurguard report`: HTML pages from a real served, fitted model, checked as a browser would see them.

The server runs in-process (the planted CNN of tests/visualize as a TorchScript model directory,
fitted on a generated folder where some class-0 images carry the planted red square; class
names and a label note are HTML-hostile on purpose); the report runs as the console script.
Pages are parsed with html.parser: every <img src> and link must exist on disk, nothing may
come from the network, and the label commands must be there. When Chromium is installed, both
kinds of page are rendered headless to PNG.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import cli_fakes as f
from cli_fakes import FakeClient, RunCli
from spurguard.client import Client
from spurguard import vocab as t
from spurguard.client.cli.report import COMPONENTS_PER_CALL
from spurguard.server.rpc.app import BackgroundServer, ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "visualize"))
from visualize_support import write_dataset, write_model_dir  # noqa: E402

SCRIPT = Path(sys.executable).with_name("spurguard")  # the console script pyproject declares
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("SPURGUARD_SERVER", None)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
COMPONENTS = 4
TOP = 3
TOP_K = 4
NOTE = '</code><script>alert("x")</script> & more'
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class Page(HTMLParser):
    """What a browser would fetch and show: img sources, link targets, the text of <code> and of
    table cells (innermost cell), every tag used."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.codes: list[str] = []
        self.rows: list[list[str]] = []
        self.tags: set[str] = set()
        self._open: dict[str, list[str]] = {}  # "code" / "td" -> its text so far
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        elif tag == "a":
            self.links.append(values["href"] or "")
        elif tag == "tr":
            self.rows.append([])
        if tag in ("code", "td"):
            self._open[tag] = []

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._open.pop(tag, []))
        if tag == "code":
            self.codes.append(text)
        elif tag == "td":
            self.rows[-1].append(text)

    def handle_data(self, data: str) -> None:
        for parts in self._open.values():
            parts.append(data)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fitted `planted` model (classes 0 and 1), component 0 of class 0 labelled spurious."""
    root = tmp_path_factory.mktemp("report")
    write_dataset(root / "data" / "train")
    config = ServerConfig(models=(str(write_model_dir(root / "model")),), store=root / "store", port=0,
                          data_roots=(root / "data",), device="cpu", grace_s=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(config) as server, Client(server.address) as client:
            list(client.fit("planted", "train", classes=[0, 1], num_components=COMPONENTS))
            client.label("planted", 0, 0, "spurious", note=NOTE)
            yield server.address
    finally:
        torch.set_num_threads(threads)


def spurguard(server: str, *argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(SCRIPT), *argv, "--server", server], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def report(served: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if not SCRIPT.exists():
        pytest.skip("the spurguard console script is not installed")
    out = tmp_path_factory.mktemp("pages") / "report"
    done = spurguard(served, "report", "--model", "planted", "--out", str(out), "--top", str(TOP), "--steps", "5",
                     "--top-k", str(TOP_K), "--json")
    return out, json.loads(done.stdout)


def test_json_names_the_index_and_a_page_per_fitted_class(report: tuple[Path, dict[str, Any]]) -> None:
    out, doc = report
    assert doc["index"] == str(out / "index.html") and Path(doc["index"]).is_file()
    assert [(c["class"], c["page"]) for c in doc["classes"]] == [(k, str(out / f"class_{k}.html")) for k in (0, 1)]
    for entry in doc["classes"]:
        assert [c["index"] for c in entry["components"]] == list(range(TOP))
        for component in entry["components"]:
            assert component["final_alpha"] >= component["start_alpha"] and Path(component["attack_image"]).is_file()
            assert len(component["top_images"]) == TOP_K and component["frames"] == []  # the report asks for none
    assert [(c["label"], c["note"]) for c in doc["classes"][0]["components"]][:2] == [("spurious", NOTE), ("unlabeled", "")]


def test_class_pages_link_only_local_files_and_carry_the_label_commands(report: tuple[Path, dict[str, Any]], served: str) -> None:
    out, _ = report
    for k in (0, 1):
        text = (out / f"class_{k}.html").read_text(encoding="utf-8")
        page = Page(text)
        # top image + heatmap per top image, one attack image, per component
        assert len(page.images) == TOP * (2 * TOP_K + 1)
        for target in page.images + page.links:
            assert ":" not in target and (out / target).is_file(), target  # relative, on disk, no scheme
        assert not page.tags & {"script", "link", "iframe", "object"}
        assert page.codes == [
            f"spurguard --server {served} label --model planted --class {k} --component {l} --as spurious"
            for l in range(TOP)
        ]
    text = (out / "class_0.html").read_text(encoding="utf-8")
    assert "&lt;/code&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in text  # the note, escaped
    assert "red thing" in text and "<script>" not in text
    assert "heatmaps: integrated gradients from gray" in text  # what the server used: TorchScript, no Grad-CAM
    assert "green &lt;thing&gt;" in (out / "class_1.html").read_text(encoding="utf-8")


def test_index_links_the_pages_with_their_label_counts(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    page = Page((out / "index.html").read_text(encoding="utf-8"))
    assert page.links == ["class_0.html", "class_1.html"] and page.images == []
    # class, shown, components, spurious, not spurious, inconsistent, unlabeled (the header row has no td)
    assert page.rows == [
        [],
        ["class 0: red thing", str(TOP), str(COMPONENTS), "1", "0", "0", str(COMPONENTS - 1)],
        ["class 1: green <thing>", str(TOP), "3", "0", "0", "0", "3"],  # 8 images of class 1 keep 3 components
    ]


def test_one_class_with_progress_on_stderr(served: str, tmp_path: Path) -> None:
    if not SCRIPT.exists():
        pytest.skip("the spurguard console script is not installed")
    done = spurguard(served, "report", "--model", "planted", "--class", "1", "--out", str(tmp_path), "--top", "1",
                     "--steps", "2", "--top-k", "1")
    assert done.stdout == f"report of model planted: {tmp_path / 'index.html'} (1 class pages)\n"
    assert done.stderr.startswith("report class 1: visualize component 0: ")
    assert sorted(p.name for p in tmp_path.glob("*.html")) == ["class_1.html", "index.html"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_pages_render_in_headless_chromium(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = report
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    sizes = {}
    for name, page in (("blank", blank), ("index", out / "index.html"), ("class", out / "class_0.html")):
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={shot}", "--window-size=1200,2000",
             page.as_uri()],
            capture_output=True, timeout=60, check=True,
        )
        assert _png_size(shot) == (1200, 2000)
        sizes[name] = shot.stat().st_size
    assert sizes["index"] > 1.5 * sizes["blank"]  # text and a table, not an empty page
    assert sizes["class"] > 30_000 and sizes["class"] > 2 * sizes["index"]  # and many pictures


# ---- the command's logic against a fake client ----


def test_a_model_without_a_fit_is_a_clean_error(cli_run: RunCli, tmp_path: Path) -> None:
    outcome = cli_run(FakeClient(get_model=f.model(fitted=())), "report", "--model", "tiny", "--out", str(tmp_path))
    assert outcome.code == 1 and outcome.err == "spurguard: error: model tiny has no fit to report; run `spurguard fit` first\n"
    assert not (tmp_path / "index.html").exists()


def test_more_components_than_one_call_takes_are_split(cli_run: RunCli, tmp_path: Path) -> None:
    many = tuple(t.Component(i, 1.0, 0.01, 0.0, -1.0, 1.0, "unlabeled", "") for i in range(COMPONENTS_PER_CALL + 4))
    fake = FakeClient(
        get_model=f.model(fitted=(3,)),
        get_components=dataclasses.replace(f.components(3), components=many, num_components=len(many)),
        list_labels=[],
        visualize=f.visualize_updates(component=2),
    )
    outcome = cli_run(fake, "report", "--model", "tiny", "--out", str(tmp_path), "--top", str(len(many)))
    assert outcome.code == 0, outcome.err
    calls = fake.called("visualize")
    assert [args[2] for args, _ in calls] == [list(range(COMPONENTS_PER_CALL)), list(range(COMPONENTS_PER_CALL, len(many)))]
    assert all(kwargs["frame_every"] == 0 and kwargs["fit_id"] == "fit-1" for _, kwargs in calls)
    assert fake.called("get_components") == [(("tiny", 3), {"top": len(many), "fit_id": "fit-1"})]


def _fake_report(
    cli_run: RunCli, out: Path, *argv: str, mean: float = 0.0, eps: float = 8.6, parameterization: str = "pixel",
    calls: list[FakeClient] | None = None,
) -> str:
    """The page of class 3 from canned answers: component 0 has heatmaps and alpha mean `mean`,
    its attack ran with `eps` and `parameterization`; the fake client is appended to `calls`."""
    components = f.components(3)
    rounded = (dataclasses.replace(components.components[0], alpha_mean=mean), *components.components[1:])
    fake = FakeClient(get_model=f.model(fitted=(3,)), list_labels=[],
                      visualize=f.visualize_updates(0, eps, parameterization),
                      get_components=dataclasses.replace(components, components=rounded))
    outcome = cli_run(fake, "report", "--model", "tiny", "--out", str(out), *argv)
    assert outcome.code == 0, outcome.err
    if calls is not None:
        calls.append(fake)
    return (out / "class_3.html").read_text(encoding="utf-8")


def test_header_states_the_eps_used(cli_run: RunCli, tmp_path: Path) -> None:
    """The radius the server says its attacks ran with (AttackResult.eps), default or asked for."""
    assert "L2 radius 2.143 (the server&#x27;s default), parameterization pixel · heatmaps" in _fake_report(
        cli_run, tmp_path / "default", eps=30 * 16 / 224)
    assert "L2 radius 1.5, parameterization pixel · heatmaps" in _fake_report(
        cli_run, tmp_path / "given", "--eps", "1.5", eps=1.5)


def test_header_states_the_parameterization_the_server_ran(cli_run: RunCli, tmp_path: Path) -> None:
    """--parameterization goes to Visualize, and the page says what each AttackResult reports."""
    fakes: list[FakeClient] = []
    page = _fake_report(cli_run, tmp_path, "--parameterization", "jitter", parameterization="jitter", calls=fakes)
    assert "parameterization jitter · heatmaps" in page
    assert {kwargs["parameterization"] for _, kwargs in fakes[0].called("visualize")} == {"jitter"}


def test_heatmaps_come_with_the_servers_colour_scale(cli_run: RunCli, tmp_path: Path) -> None:
    text = _fake_report(cli_run, tmp_path)
    gradient = "linear-gradient(to right, rgb(0, 0, 5) 0%, rgb(87, 15, 110) 25%"
    assert gradient in text and '<p class="legend">heatmap colour: <span>low' in text
    assert "high: where alpha comes from most" in text


def test_an_alpha_mean_zero_up_to_rounding_prints_as_zero(cli_run: RunCli, tmp_path: Path) -> None:
    text = _fake_report(cli_run, tmp_path, mean=-1.2e-9)
    assert text.count("<tr><th>alpha mean</th><td>0</td></tr>") == 2 and "e-09" not in text


def test_label_commands_never_carry_the_token(cli_run: RunCli, tmp_path: Path) -> None:
    """The pages are shared and mailed around: their copy-paste commands name the server, not the secret."""
    text = _fake_report(cli_run, tmp_path, "--server", "h:1", "--token", "s3cret-token")
    assert "spurguard --server h:1 label --model tiny --class 3 --component 0 --as spurious" in text
    assert "s3cret" not in text and "--token" not in text
