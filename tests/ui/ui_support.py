"""A labelling world for the ui tests: a real spurguard server with the demo model fitted on
freshly generated planted data, tokens for several people, labelling pages for each of them,
and headless Chromium (Debian's chromium + chromium-driver, no network) driven by Selenium."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spurguard.client import Client
from spurguard.server.demo.generator import generate, load_ground_truth
from spurguard.server.rpc import auth
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.ui.server import UiServer, UiSettings
from spurguard.vocab import TransferSummary

MODEL = "demo"
SOURCE = "demo_robust"  # its labels are transferred to MODEL, as `make demo` does
SOURCE_LABEL = (0, "spurious", "the stamp, seen on the robust model")  # (component, label, note) of each planted class
# token name -> (role, token): two labellers, someone who may only read, the admin who fits
PEOPLE = {
    "alice": ("label", "tok-alice-1"),
    "bob": ("label", "tok-bob-22"),
    "viewer": ("score", "tok-viewer-333"),
    "admin": ("admin", "tok-admin-4444"),
}
UI_STEPS = 20  # attack steps per component on the page: enough frames to animate, quick at 64 px
UI_TOP = 4  # components per class page
UI_TOP_K = 3
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@dataclass(frozen=True)
class World:
    address: str
    metrics_port: int
    planted: dict[str, int]  # feature name -> its class
    unfitted: int  # a class the fit left out

    def client(self, person: str) -> Client:
        return Client(self.address, timeout=30, token=PEOPLE[person][1])


@contextmanager
def fitted_world(tmp: Path) -> Iterator[World]:
    """The server, with the planted classes of the demo fitted (by the admin, over gRPC)."""
    data = generate(tmp / "data", train_per_class=40, test_per_class=2, spurious_per_feature=2).root
    truth = load_ground_truth(data)
    tokens = tmp / "tokens.toml"
    auth.write_tokens(tokens, [auth.Token.of(name, role, token) for name, (role, token) in PEOPLE.items()])  # type: ignore[arg-type]
    config = ServerConfig(models=(MODEL, SOURCE), store=tmp / "store", port=0, device="cpu", grace_s=1.0,
                          data_roots=(data,), auth_tokens=tokens, metrics_port=0)
    with BackgroundServer(config) as server:
        planted = {f.name: f.class_index for f in truth.features}
        unfitted = min(set(range(len(truth.classes))) - set(planted.values()))
        assert server.metrics_port is not None
        world = World(server.address, server.metrics_port, planted, unfitted)
        classes = sorted(planted.values())
        with world.client("admin") as admin:
            for model in (MODEL, SOURCE):
                *_, summary = admin.fit(model, str(data / "train"), classes=classes)
                assert summary.classes, f"the fit of {model} committed no classes"
            component, label, note = SOURCE_LABEL
            for k in classes:
                admin.label(SOURCE, k, component, label, note=note)  # type: ignore[arg-type]
            *_, transfer = admin.transfer(SOURCE, MODEL)
            assert isinstance(transfer, TransferSummary) and transfer.classes
        yield world


@contextmanager
def labelling_page(world: World, person: str, **changes: object) -> Iterator[UiServer]:
    """`spurguard ui` for one person: their token, any free port."""
    settings = UiSettings(**dict(dict(port=0, top=UI_TOP, top_k=UI_TOP_K, steps=UI_STEPS, poll_s=0.25), **changes))  # type: ignore[arg-type]
    with world.client(person) as client, UiServer(client, settings) as page:
        yield page


def chromium(profile: Path):  # -> selenium.webdriver.Chrome (imported lazily: only the browser tests need it)
    """Headless Chromium through Debian's chromium-driver; no network beyond loopback."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={profile}", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
