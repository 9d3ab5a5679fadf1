"""The try-it page in a real browser: Debian's Chromium, driven by Playwright, against a real server
on 127.0.0.1 serving the demo model (real ImageNet weights). Screenshots go to artifacts/screenshots.

Never `playwright install` (it downloads a browser): `.ci/run` installs Debian's chromium. Without
it these tests skip, unless REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from tests.digits import IMAGE_SIZE, Digits
from tests.helpers import IMAGENET_CATS, make_settings, running_server

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required (REQUIRE_BROWSER=1) but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport=DESKTOP,
        )
        yield context
        context.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    page.close()
    assert not problems, f"uncaught errors in the page: {problems}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, chelsea_jpeg: bytes, coffee_jpeg: bytes) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = {"chelsea.jpg": chelsea_jpeg, "coffee.jpg": coffee_jpeg, "notes.txt": b"shopping list: cat food\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def _open(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#model-info")).to_contain_text("tf_efficientnet_lite0 · 1000 classes · running on cpu")


def test_chelsea_is_a_cat_and_the_bar_matches_the_score(page: Page, demo_server: str, photos: dict[str, Path]) -> None:
    _open(page, demo_server)
    page.set_input_files("#file-input", photos["chelsea.jpg"])
    card = page.locator(".card").first
    expect(card.locator(".labels li")).to_have_count(5)
    top = card.locator(".labels li").first
    assert int(top.get_attribute("data-index") or -1) in IMAGENET_CATS
    expect(top.locator(".label-name")).to_contain_text("cat")
    score = float(top.get_attribute("data-score") or "nan")
    expect(top.locator(".label-score")).to_have_text(f"{score * 100:.1f}%")  # the JSON's score, shown as is
    bar = top.locator(".bar").bounding_box()
    fill = top.locator(".bar span").bounding_box()
    assert bar and fill and abs(fill["width"] / bar["width"] - score) < 0.01
    expect(card.locator(".meta")).to_contain_text("ms on the server")
    expect(card.locator(".preview")).to_be_visible()
    page.screenshot(path=SHOTS / "desktop.png", full_page=True)


def test_two_photos_make_two_cards(page: Page, demo_server: str, photos: dict[str, Path]) -> None:
    _open(page, demo_server)
    page.set_input_files("#file-input", [photos["chelsea.jpg"], photos["coffee.jpg"]])
    expect(page.locator(".card")).to_have_count(2)
    for card in page.locator(".card").all():
        expect(card.locator(".labels li")).to_have_count(5)
    names = sorted(page.locator(".card .filename").all_inner_texts())
    assert names == ["chelsea.jpg", "coffee.jpg"]


def test_a_text_file_gets_plain_words_and_the_page_keeps_working(
    page: Page, demo_server: str, photos: dict[str, Path]
) -> None:
    _open(page, demo_server)
    page.set_input_files("#file-input", photos["notes.txt"])
    failed = page.locator(".card.failed")
    expect(failed.locator(".status")).to_have_text(
        "This file is not an image the model can read. Try a JPEG or PNG photo."
    )
    expect(failed.locator(".status")).to_have_attribute("role", "alert")
    page.set_input_files("#file-input", photos["chelsea.jpg"])
    expect(page.locator(".card")).to_have_count(2)
    expect(page.locator(".card:not(.failed) .labels li")).to_have_count(5)


def test_keyboard_only_opens_the_picker_and_reaches_the_result(
    page: Page, demo_server: str, photos: dict[str, Path]
) -> None:
    # Playwright turns file-chooser interception on with a fire-and-forget message when the first
    # "filechooser" listener is added; added only inside expect_file_chooser it can lose the race with
    # the key press (the chooser then opens unintercepted and the wait times out). A listener added
    # before the page loads makes interception certain by the time Enter is pressed.
    page.on("filechooser", lambda chooser: None)
    _open(page, demo_server)
    for _ in range(10):  # Tab from the top of the page to the picker button
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "pick":
            break
    assert page.evaluate("document.activeElement.id") == "pick"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(photos["chelsea.jpg"])
    expect(page.locator(".card .labels li")).to_have_count(5)
    for _ in range(10):  # on to the result card
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('card')"):
            break
    focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == "Result for chelsea.jpg"


def test_phone_width_fits_and_is_screenshotted(
    context: BrowserContext, demo_server: str, photos: dict[str, Path]
) -> None:
    page = context.new_page()
    try:
        page.set_viewport_size(PHONE)
        _open(page, demo_server)
        page.set_input_files("#file-input", photos["chelsea.jpg"])
        expect(page.locator(".card .labels li")).to_have_count(5)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
        page.screenshot(path=SHOTS / "phone.png", full_page=True)
    finally:
        page.close()


def test_api_key_is_asked_once_and_kept_for_the_tab(page: Page, tiny_checkpoint: Path, photos: dict[str, Path]) -> None:
    settings = make_settings(checkpoint_path=tiny_checkpoint, model_name="test_resnet", api_key="tab-only-key")
    with running_server(settings) as url:
        page.goto(url + "/")
        expect(page.locator("#key-panel")).to_be_visible()
        page.fill("#api-key", "tab-only-key")
        page.keyboard.press("Enter")
        expect(page.locator("#model-info")).to_contain_text("test_resnet · 5 classes")
        expect(page.locator("#key-panel")).to_be_hidden()
        page.set_input_files("#file-input", photos["chelsea.jpg"])
        expect(page.locator(".card .labels li")).to_have_count(5)
        assert page.evaluate("sessionStorage.getItem('cat-breeds-api-key')") == "tab-only-key"
        assert page.evaluate("localStorage.length") == 0  # never beyond this tab


def test_the_page_shows_what_was_measured_and_what_serves(page: Page, demo_dir: Path, demo_eval_dir: Path) -> None:
    """The model's evaluation table: every candidate measured on the demo's evaluation crops, the one
    that serves marked, the gate's verdicts in words."""
    # the first start measures every candidate on the crops (in its prepare process): a minute at most
    with running_server(make_settings(checkpoint_path=demo_dir, eval_dir=demo_eval_dir), timeout_s=300) as url:
        _open(page, url)
        panel = page.locator("#evaluation")
        expect(panel).to_be_visible()
        panel.locator("summary").click()
        rows = page.locator("#evaluation-table tbody tr")
        expect(rows.first).to_be_visible()
        model = page.evaluate("fetch('api/v1/model').then(r => r.json())")
        candidates = model["evaluation"]["candidates"]
        expect(rows).to_have_count(len(candidates))
        expect(page.locator("#evaluation-caption")).to_contain_text("216 held-out images")
        chosen = page.locator("#evaluation-table tr.chosen")
        expect(chosen).to_have_count(1)
        expect(chosen).to_contain_text(f"{model['runtime']}")
        expect(chosen).to_contain_text("passed · serving")
        expect(page.locator("#evaluation-chosen")).to_have_text(f"{model['runtime']} {model['precision']}")
        page.screenshot(path=str(SHOTS / "evaluation.png"), full_page=True)


def test_a_fold_ensemble_shows_spread_not_sure_the_model_view_and_the_why_overlay(
    page: Page, digits: Digits, tmp_path: Path
) -> None:
    """The digits' 3 folds, calibrated on their held-out digits: each score's spread as an error bar,
    "not sure" in words, the model view (folds, reliability diagram, confusion matrix) and, on the
    toggle, the Grad-CAM heatmap drawn over the photo."""
    digit = tmp_path / "digit.png"
    Image.fromarray(digits.images[0]).convert("RGB").save(digit)
    settings = make_settings(
        checkpoint_path=digits.folds,
        image_size=IMAGE_SIZE,
        eval_dir=digits.eval_dir,
        min_confidence=1.0,  # every answer below it: "not sure" shown
        runtime="torch",
        precision="fp32",
    )
    with running_server(settings, timeout_s=300) as url:
        page.goto(url + "/")
        expect(page.locator("#model-info")).to_contain_text("resnet10t · 10 classes · 3 folds as one model")
        view = page.locator("#model-view")
        expect(view).to_be_visible()
        view.locator("summary").click()
        expect(page.locator("#folds-table tbody tr")).to_have_count(3)
        expect(page.locator("#calibration-text")).to_contain_text("expected calibration error")
        expect(page.locator("#reliability rect.after").first).to_be_attached()
        expect(page.locator("#confusion rect")).to_have_count(100)

        page.locator("#file-input").set_input_files(str(digit))
        card = page.locator(".card").first
        expect(card.locator(".labels li").first).to_be_visible()
        expect(card.locator(".labels li .spread").first).to_be_attached()
        expect(card.locator(".uncertain")).to_contain_text("Not sure")

        card.locator(".why-toggle").check()
        overlay = card.locator("canvas.overlay")
        expect(overlay).to_be_visible(timeout=60_000)
        expect(overlay).to_have_attribute("data-layer", "layer1")
        expect(card.locator(".preview")).to_be_hidden()
        page.screenshot(path=str(SHOTS / "why.png"), full_page=True)
        card.locator(".why-toggle").uncheck()
        expect(overlay).to_be_hidden()
        expect(card.locator(".preview")).to_be_visible()
