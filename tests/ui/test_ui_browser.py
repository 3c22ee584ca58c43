"""The labelling page in a real browser (issue 14): headless Chromium through Selenium against
`spurguard ui` pages for several people, all on one real spurguard server with the demo fitted.

What a labeller does is what these tests do: keys and buttons on the class page; what they
check is what the server then holds (over gRPC) and what another person's page shows.
"""
from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ui_support import CHROMEDRIVER, CHROMIUM, MODEL, UI_TOP, UI_TOP_K, World, chromium, labelling_page

pytest.importorskip("selenium")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("chromium and chromium-driver are not installed (CI installs them: apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LIVE_S = 2.0  # the bound: another labeller's change shows within this
LOAD_S = 120.0  # every component's top images, heatmaps and attack, on 2 busy cores


@contextmanager
def browser(profile: Path) -> Iterator[WebDriver]:
    driver = chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 20.0, what: str = "") -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message=what)


def open_class(driver: WebDriver, page_url: str, class_index: int) -> None:
    driver.get(f"{page_url}models/{MODEL}/classes/{class_index}")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "section.component.focused"), what="the class page")


def keys(driver: WebDriver, text: str) -> None:
    """Type at whatever has the focus (the page itself unless a note field has it)."""
    driver.switch_to.active_element.send_keys(text)


def badge(driver: WebDriver, component: int) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#component-{component} [data-role=badge]").text


def who(driver: WebDriver, component: int) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#component-{component} [data-role=who]").text


def focus(driver: WebDriver, component: int) -> None:
    """Walk there with j from the top, as a person would."""
    for _ in range(component):
        keys(driver, "j")
    wait(driver, lambda d: "focused" in d.find_element(By.ID, f"component-{component}").get_attribute("class"))


def visualised_rows(driver: WebDriver) -> list[Any]:
    """The class page's rows, once every one has its top images, heatmaps and finished attack."""
    rows = driver.find_elements(By.CSS_SELECTOR, "section.component")
    wait(driver, lambda d: all(r.get_attribute("data-attack") == "done" for r in rows), timeout=LOAD_S,
         what="every component's visualisation")
    return rows


def test_a_component_labelled_with_the_keyboard_is_stored_with_its_note_and_author(
    world: World, tmp_path: Path
) -> None:
    k = world.planted["watermark"]
    with labelling_page(world, "alice") as page, browser(tmp_path / "alice") as driver:
        open_class(driver, page.url, k)
        focus(driver, 1)
        keys(driver, "s")
        wait(driver, lambda d: badge(d, 1) == "spurious", what="the spurious label")
        keys(driver, "/")
        note = driver.switch_to.active_element
        assert note.get_attribute("data-role") == "note"
        note.send_keys("the stamp in the lower corner\n")
        wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#component-1 [data-role=status]").text == "saved")
        assert who(driver, 1).startswith("by alice, ")
    with world.client("admin") as admin:
        (record,) = admin.list_labels(MODEL, class_index=k, component=1)
    assert (record.label, record.note, record.author) == ("spurious", "the stamp in the lower corner", "alice")


def label_and_watch(labeller: WebDriver, name: str, watcher: WebDriver, component: int, note: str, label: str) -> None:
    """`labeller` writes a note and clicks a label's button; `watcher`'s page, open on the same
    class, must show it (with the labeller's name) within LIVE_S of the labeller seeing it stored."""
    shown = label.replace("_", " ")
    focus(labeller, component)
    keys(labeller, "/")
    keys(labeller, note)
    labeller.find_element(By.CSS_SELECTOR, f"#component-{component} button[data-label={label}]").click()
    wait(labeller, lambda d: badge(d, component) == shown, what=f"{name}'s own label")
    stored = time.monotonic()
    wait(watcher, lambda d: badge(d, component) == shown and name in who(d, component),
         timeout=LIVE_S + 5, what=f"{name}'s label on the other page")
    assert time.monotonic() - stored < LIVE_S


def test_another_labellers_change_shows_without_a_reload_and_the_later_one_wins(
    world: World, tmp_path: Path
) -> None:
    k, component = world.planted["stripes"], 2
    with labelling_page(world, "alice") as alice_page, labelling_page(world, "bob") as bob_page, \
            browser(tmp_path / "alice") as alice, browser(tmp_path / "bob") as bob:
        open_class(alice, alice_page.url, k)
        open_class(bob, bob_page.url, k)
        label_and_watch(alice, "alice", bob, component, "the object's own texture", "not_spurious")
        label_and_watch(bob, "bob", alice, component, "stripes behind some objects only", "inconsistent")
        history = alice.find_element(By.CSS_SELECTOR, f"#component-{component} [data-role=history]")
        history.click()
        entries = history.find_elements(By.TAG_NAME, "li")
        assert [e.text.split()[0:2] for e in entries] == [["not", "spurious"], ["inconsistent", "bob,"]]
        assert "the object's own texture" in entries[0].text and "alice" in entries[0].text
        assert "stripes behind some objects only" in entries[1].text
    with world.client("admin") as admin:
        (record,) = admin.list_labels(MODEL, class_index=k, component=component)
        writes = admin.label_history(MODEL, class_index=k, component=component)
    assert (record.label, record.author, record.note) == ("inconsistent", "bob", "stripes behind some objects only")
    assert [(w.author, w.label, w.note) for w in writes] == [
        ("alice", "not_spurious", "the object's own texture"), ("bob", "inconsistent", "stripes behind some objects only"),
    ]


def _images(driver: WebDriver) -> list[dict[str, Any]]:
    return driver.execute_script(
        "return [...document.images].map(i => ({cls: i.className, complete: i.complete, width: i.naturalWidth,"
        " shown: getComputedStyle(i).display !== 'none'}))")


def test_every_image_loads_the_attack_animates_and_heatmaps_toggle_with_a_colour_scale(
    world: World, tmp_path: Path
) -> None:
    k = world.planted["flower"]
    with labelling_page(world, "alice") as page, browser(tmp_path / "alice") as driver:
        open_class(driver, page.url, k)
        rows = visualised_rows(driver)
        assert len(rows) == UI_TOP
        images = _images(driver)
        assert all(i["complete"] and i["width"] > 0 for i in images), images  # no broken image
        kinds = [i["cls"] for i in images]
        assert kinds.count("attack-image") == UI_TOP
        assert kinds.count("picture") == kinds.count("heat") == UI_TOP * UI_TOP_K
        frames = [int(r.get_attribute("data-frames")) for r in rows]
        assert min(frames) >= 5, frames  # 20 steps, a frame every 2: the attack streamed, not one picture
        assert not any(i["shown"] for i in _images(driver) if i["cls"] == "heat")
        keys(driver, "h")
        shown = {i["cls"] for i in _images(driver) if i["shown"]}
        assert shown == {"attack-image", "heat"}
        scale = driver.find_element(By.CSS_SELECTOR, ".colour-scale .bar")
        assert "linear-gradient" in scale.value_of_css_property("background-image")
        assert "rgb(0, 0, 5)" in scale.value_of_css_property("background-image")


def _cancelled_visualize_calls(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(r'spurguard_requests_total\{code="CANCELLED",model="demo",rpc="Visualize"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_leaving_the_page_cancels_its_attacks_on_the_server(world: World, tmp_path: Path) -> None:
    k = world.planted["watermark"]
    metrics = f"http://127.0.0.1:{world.metrics_port}/metrics"
    before = _cancelled_visualize_calls(metrics)
    time.sleep(0.5)
    while (now := _cancelled_visualize_calls(metrics)) != before:  # earlier pages' calls still ending
        before = now
        time.sleep(0.5)
    with labelling_page(world, "alice", steps=5000) as page, browser(tmp_path / "alice") as driver:
        open_class(driver, page.url, k)
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#component-0 img.attack-image"), timeout=LOAD_S,
             what="the first attack frame")
        driver.get("about:blank")
        deadline = time.monotonic() + 10
        while _cancelled_visualize_calls(metrics) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _cancelled_visualize_calls(metrics) == before + 2  # both running attacks, not left to run 5000 steps


def test_a_token_that_may_only_score_is_told_it_is_not_allowed(world: World, tmp_path: Path) -> None:
    k = world.planted["watermark"]
    with labelling_page(world, "viewer") as page, browser(tmp_path / "viewer") as driver:
        open_class(driver, page.url, k)
        keys(driver, "n")
        banner = wait(driver, lambda d: d.find_element(By.ID, "banner") if d.find_element(By.ID, "banner").is_displayed()
                      else None, what="the banner")
        assert banner.text.startswith("Not allowed: the token this page uses may not do that.")
        assert "PERMISSION_DENIED" in banner.text
        caption = driver.find_element(By.CSS_SELECTOR, "#component-0 [data-role=attack-caption]")
        wait(driver, lambda d: caption.text.startswith("Not allowed"), what="the attack's refusal")
    with world.client("admin") as admin:
        assert all(r.author != "viewer" for r in admin.label_history(MODEL, class_index=k))


def test_server_errors_are_pages_in_words(world: World, tmp_path: Path) -> None:
    with labelling_page(world, "alice") as page, browser(tmp_path / "alice") as driver:
        driver.get(f"{page.url}models/no-such-model")
        problem = wait(driver, lambda d: d.find_element(By.ID, "problem"))
        assert problem.get_attribute("data-code") == "NOT_FOUND"
        assert "no-such-model" in problem.text
        driver.get(f"{page.url}models/{MODEL}/classes/{world.unfitted}")
        problem = wait(driver, lambda d: d.find_element(By.ID, "problem"))
        assert problem.get_attribute("data-code") == "FAILED_PRECONDITION" and "Not possible yet" in problem.text


def _full_page_screenshot(driver: WebDriver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 6000))
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(path)), path


def test_screenshots_of_the_pages(world: World, tmp_path: Path) -> None:
    """Pictures of the three pages to look at (`make ui-screenshots` keeps them in
    ui-screenshots/; here they go to a temporary folder): labels of two people, a note, the
    attacks done, one page with heatmaps shown."""
    out = Path(os.environ.get("SPURGUARD_UI_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    k = world.planted["watermark"]
    with world.client("bob") as bob:
        bob.label(MODEL, k, 0, "not_spurious", note="the star itself")
    with labelling_page(world, "alice") as page, browser(tmp_path / "alice") as driver:
        open_class(driver, page.url, k)
        visualised_rows(driver)
        focus(driver, 2)
        keys(driver, "i")
        wait(driver, lambda d: badge(d, 2) == "inconsistent")
        _full_page_screenshot(driver, out / "class.png")
        keys(driver, "h")
        _full_page_screenshot(driver, out / "class-heatmaps.png")
        driver.get(f"{page.url}models/{MODEL}")
        _full_page_screenshot(driver, out / "classes.png")
        driver.get(page.url)
        _full_page_screenshot(driver, out / "models.png")
    for name in ("class", "class-heatmaps", "classes", "models"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
