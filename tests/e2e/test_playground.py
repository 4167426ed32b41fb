"""The playground and ops pages in a real headless Chromium (Debian's chromium + chromium-driver, Selenium)
against a real stack: Redis, moto, a worker process (nano recipe weights) and the gateway with API keys on.

Screenshots of each page land in test-artifacts/playground/ (BIREFNET_TEST_ARTIFACTS overrides the
directory); the path is printed. `make test` installs chromium via `make browser` where apt is available.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.gateway import ALICE, OPS, GatewayStack, start_gateway_stack
from tests.helpers.images import png_bytes
from tests.helpers.servers import FileServer
from tests.helpers.stack import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("BIREFNET_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "playground"
WAIT = 90  # seconds: a loaded 2-core machine runs the worker slowly

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        pytest.fail("CI needs chromium and chromedriver (make browser installs them)", pytrace=False)
    pytest.skip(
        "no chromium/chromedriver on PATH: run `make browser` (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 - after the skip: selenium is a dev dependency
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> Iterator[GatewayStack]:
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp_path_factory.mktemp("playground"),
        workers=("general-light",),
        webhooks=False,
    )
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2000",
        "--force-prefers-reduced-motion",
        "--force-color-profile=srgb",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(900, min(int(height) + 200, 4000)))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def photo(tmp_path: Path, name: str = "astronaut.png", size: tuple[int, int] = (192, 192)) -> Path:
    from skimage import data

    path = tmp_path / name
    Image.fromarray(data.astronaut()).resize(size).save(path)
    return path


def wait_until(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        console = "\n".join(str(e) for e in driver.get_log("browser"))
        status = driver.find_element(By.ID, "status").text if driver.find_elements(By.ID, "status") else ""
        raise AssertionError(
            f"timed out waiting for {what}; status {status!r}; console:\n{console}"
        ) from None


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_until(
        driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), "page ready", 30
    )


def type_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.TAB)  # TAB fires `change`, which stores it for the other page


def image_loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        "const i = document.getElementById(arguments[0]); return !i.hidden && i.complete && i.naturalWidth > "
        "0;",
        element_id,
    )


def test_upload_shows_cutout_mask_json_and_snippets(gs, browser, tmp_path):
    open_page(browser, f"{gs.url}/playground")
    type_key(browser, ALICE)
    assert Select(browser.find_element(By.ID, "endpoint")).first_selected_option.text == "fal-ai/birefnet/v2"
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("General Use (Light)")
    Select(browser.find_element(By.ID, "output_format")).select_by_visible_text("png")
    browser.find_element(By.ID, "output_mask").click()
    browser.find_element(By.ID, "image-file").send_keys(str(photo(tmp_path)))
    assert "astronaut.png" in browser.find_element(By.ID, "file-chosen").text
    # Two requests ahead of ours, each held 2 s in its download, so the page sees its queue position move.
    slow = FileServer({"/slow.png": (png_bytes((32, 32)), "image/png")}, delays={"/slow.png": 2.0})
    try:
        with gs.client(ALICE) as client:
            for _ in range(2):
                client.post(
                    "/queue/fal-ai/birefnet/v2", json={"image_url": slow.url("/slow.png")}
                ).raise_for_status()
        browser.find_element(By.ID, "run").click()
        wait_until(
            browser, lambda d: d.find_element(By.ID, "status").text.startswith("Completed"), "Completed"
        )
    finally:
        slow.stop()
    wait_until(
        browser,
        lambda d: (
            image_loaded(d, "cutout-img") and image_loaded(d, "mask-img") and image_loaded(d, "original-img")
        ),
        "the three images to load",
    )
    assert not browser.find_element(By.ID, "error").is_displayed()
    warning = browser.find_element(By.ID, "result-warning")  # the result's own warning, shown as such
    assert warning.is_displayed() and "UNTRAINED WEIGHTS" in warning.text

    result = json.loads(browser.find_element(By.ID, "result-json").text)
    assert (result["image"]["width"], result["image"]["height"]) == (192, 192)
    assert result["mask_image"]["content_type"] == "image/png"
    cutout = Image.open(io.BytesIO(httpx.get(result["image"]["url"]).content))
    assert cutout.mode == "RGBA" and cutout.size == (192, 192), "the page shows the stored RGBA cut-out"
    shown = browser.find_element(By.ID, "cutout-img").get_attribute("src")
    assert shown == result["image"]["url"]
    download = browser.find_element(By.ID, "cutout-download")
    assert download.get_attribute("href") == result["image"]["url"]
    assert download.get_attribute("download") == result["image"]["file_name"]

    logs = browser.find_element(By.ID, "logs").text
    assert "uploaded astronaut.png" in logs, logs
    ahead = [int(n) for n in re.findall(r"In queue: position (\d+)", logs)]
    assert ahead and ahead[0] >= 1 and ahead[-1] == 0, f"the queue position counts down live: {logs}"
    assert logs.index("In queue: position 0") < logs.index("In progress")
    assert "loading image" in logs, "worker log lines arrive through the status stream"
    assert "Completed" in logs

    # The snippets repeat this request, with the key left in $FAL_KEY.
    curl = browser.find_element(By.ID, "snippet").text
    assert f'curl -s -X POST "{gs.url}/queue/fal-ai/birefnet/v2"' in curl and '"output_mask":true' in curl
    assert '"image_url":"' in curl and "$FAL_KEY" in curl and "alice-secret" not in curl
    browser.find_element(By.CSS_SELECTOR, "label[for=lang-python]").click()
    python = browser.find_element(By.ID, "snippet").text
    assert 'fal_client.subscribe(\n    "fal-ai/birefnet/v2"' in python and '"output_mask": True' in python
    assert f'QUEUE_URL_FORMAT = "{gs.url}/queue/"' in python  # plain http: the client's https formats patched
    # Copied as is, the Python snippet runs the same request with fal's own client.
    ran = subprocess.run(
        [sys.executable, "-c", python],
        env={**os.environ, "FAL_KEY": ALICE},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1].startswith("http://127.0.0.1:"), ran.stdout
    browser.find_element(By.CSS_SELECTOR, "label[for=lang-js]").click()
    js = browser.find_element(By.ID, "snippet").text
    assert 'fal.subscribe("fal-ai/birefnet/v2"' in js and "output_mask: true" in js
    assert "requestMiddleware" in js and "alice-secret" not in js
    browser.find_element(By.CSS_SELECTOR, "label[for=lang-curl]").click()
    if shutil.which("curl"):  # the curl snippet's submit, copied as is, queues the same request
        submit = curl.split("# Then")[0]
        ran = subprocess.run(
            ["bash", "-c", submit],
            env={**os.environ, "FAL_KEY": ALICE},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(ran.stdout)["status"] == "IN_QUEUE", ran.stdout + ran.stderr
    screenshot(browser, "playground-result")


def test_bad_image_shows_the_models_error(gs, browser):
    open_page(browser, f"{gs.url}/playground")
    type_key(browser, ALICE)
    Select(browser.find_element(By.ID, "endpoint")).select_by_value("v1")
    assert browser.find_element(By.ID, "mask_only").get_attribute("disabled") is not None  # v2 only
    Select(browser.find_element(By.ID, "endpoint")).select_by_value(
        "v2"
    )  # this stack's worker serves v2 Light
    assert browser.find_element(By.ID, "mask_only").get_attribute("disabled") is None
    # Dropped on the drop zone (a synthetic drop event carrying a File, as a drag from the desktop does).
    browser.execute_script("""
        const file = new File(["<html>this is not an image</html>"], "broken.png", {type: "image/png"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable:
        true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """)
    assert "broken.png" in browser.find_element(By.ID, "file-chosen").text
    browser.find_element(By.ID, "run-form").submit()

    error = browser.find_element(By.ID, "error")
    wait_until(browser, lambda d: error.is_displayed() and error.text, "the error to show")
    assert "HTTP 422" in error.text and "image_load_error" in error.text, error.text
    assert browser.find_element(By.ID, "status").text.startswith("Failed")
    assert error.get_attribute("role") == "alert"
    body = browser.find_element(By.ID, "result-json").text
    assert '"type": "image_load_error"' in body
    assert not image_loaded(browser, "cutout-img")
    assert not browser.find_element(By.ID, "cutout-img").is_displayed()
    assert not browser.find_element(By.ID, "cutout-download").is_displayed()
    assert "fal_client.subscribe" not in browser.find_element(By.ID, "snippet").text  # curl tab still chosen
    assert '/queue/fal-ai/birefnet/v2"' in browser.find_element(By.ID, "snippet").text
    screenshot(browser, "playground-bad-image")


def video_state(driver, element_id: str) -> dict:
    return driver.execute_script(
        """
        const v = document.getElementById(arguments[0]);
        return {hidden: v.hidden, ready: v.readyState, duration: v.duration, width: v.videoWidth,
                height: v.videoHeight, error: v.error && v.error.code, src: v.currentSrc};
    """,
        element_id,
    )


@pytest.mark.parametrize("output_type", ["VP9 (.webm)", "X264 (.mp4)", "GIF (.gif)"])
def test_video_upload_plays_the_cutout_and_mask(gs, browser, tmp_path, output_type):
    from tests.helpers.video import make_clip

    clip = Path(make_clip(str(tmp_path / "clip.mp4"), width=96, height=64, seconds=1.0, fps=12))
    open_page(browser, f"{gs.url}/playground")
    type_key(browser, ALICE)
    assert not browser.find_element(By.ID, "video_quality").is_displayed()  # image endpoints: no video fields
    Select(browser.find_element(By.ID, "endpoint")).select_by_value("v2/video")
    # The form speaks of videos now, and offers fal's video fields with fal's defaults.
    assert browser.find_element(By.ID, "input-legend").text == "Video"
    assert browser.find_element(By.ID, "url-field-name").text == "video_url"
    assert Select(browser.find_element(By.ID, "video_quality")).first_selected_option.text == "high"
    assert Select(browser.find_element(By.ID, "video_write_mode")).first_selected_option.text == "balanced"
    Select(browser.find_element(By.ID, "output_format")).select_by_visible_text(output_type)
    Select(browser.find_element(By.ID, "video_write_mode")).select_by_visible_text("fast")
    if not browser.find_element(By.ID, "output_mask").is_selected():
        browser.find_element(By.ID, "output_mask").click()
    browser.find_element(By.ID, "image-file").send_keys(str(clip))
    assert "clip.mp4" in browser.find_element(By.ID, "file-chosen").text
    browser.find_element(By.ID, "run").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Completed"), "Completed")
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    logs = browser.find_element(By.ID, "logs").text
    assert "uploaded clip.mp4" in logs and "In progress" in logs, logs
    assert "loading video" in logs and "frames 12/12" in logs, "the worker's progress reaches the page"
    assert "cannot" not in logs, logs

    result = json.loads(browser.find_element(By.ID, "result-json").text)
    assert result["video"]["num_frames"] == 12 and result["mask_video"] is not None
    gif = output_type.startswith("GIF")
    # Every video plays: the browser decodes its metadata, with the clip's duration and size (a GIF output
    # is an image, shown as one).
    players = ["original-video"] + ([] if gif else ["cutout-video", "mask-video"])
    for element in players:
        wait_until(
            browser,
            lambda d, e=element: video_state(d, e)["ready"] >= 1 or video_state(d, e)["error"],
            f"{element} to load its metadata",
            30,
        )
        state = video_state(browser, element)
        assert not state["hidden"] and state["error"] is None, (element, state)
        assert (state["width"], state["height"]) == (96, 64), (element, state)
        assert abs(state["duration"] - 1.0) < 0.1, (element, state)
    if gif:
        wait_until(
            browser, lambda d: image_loaded(d, "cutout-img") and image_loaded(d, "mask-img"), "the GIFs"
        )
        assert not browser.find_element(By.ID, "cutout-video").is_displayed()
        assert browser.find_element(By.ID, "cutout-img").get_attribute("src") == result["video"]["url"]
    else:
        assert browser.find_element(By.ID, "cutout-video").get_attribute("src") == result["video"]["url"]
        assert not image_loaded(browser, "cutout-img")
    download = browser.find_element(By.ID, "cutout-download")
    assert download.get_attribute("download") == result["video"]["file_name"]
    assert result["video"]["file_name"] in download.text

    curl = browser.find_element(By.ID, "snippet").text
    assert '/queue/fal-ai/birefnet/v2/video"' in curl and '"video_url":"' in curl
    assert '"video_write_mode":"fast"' in curl and "video_quality" not in curl  # only what differs
    if output_type.startswith(
        "VP9"
    ):  # copied as is, the Python snippet runs the same request with fal's client
        browser.find_element(By.CSS_SELECTOR, "label[for=lang-python]").click()
        python = browser.find_element(By.ID, "snippet").text
        assert 'print(result["video"]["url"])' in python
        ran = subprocess.run(
            [sys.executable, "-c", python],
            env={**os.environ, "FAL_KEY": ALICE},
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip().splitlines()[-1].startswith("http://127.0.0.1:"), ran.stdout
        browser.find_element(By.CSS_SELECTOR, "label[for=lang-js]").click()
        assert "console.log(result.data.video.url);" in browser.find_element(By.ID, "snippet").text
        browser.find_element(By.CSS_SELECTOR, "label[for=lang-curl]").click()
    screenshot(browser, f"playground-video-{output_type.split()[0].lower()}")


def test_ops_page_lists_the_running_worker(gs, browser):
    open_page(browser, f"{gs.url}/playground/ops")
    type_key(browser, ALICE)  # not an admin key
    browser.find_element(By.ID, "refresh").click()
    error = browser.find_element(By.ID, "error")
    wait_until(browser, lambda d: error.is_displayed() and "403" in error.text, "the 403 for a non-admin key")
    assert "admin key" in error.text

    type_key(browser, OPS)
    browser.find_element(By.ID, "refresh").click()
    wait_until(
        browser,
        lambda d: (
            not error.is_displayed()
            and "worker" in d.find_element(By.ID, "ops-status").text
            and "general-light" in d.find_element(By.ID, "workers").text
        ),
        "the workers table",
    )
    workers = browser.find_element(By.ID, "workers").text
    assert "general-light@" in workers and "cpu" in workers and "UNTRAINED: general-light" in workers
    queues = browser.find_element(By.ID, "queues")
    row = queues.find_element(By.XPATH, ".//tbody/tr[th[normalize-space()='general-light']]")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "v2: General Use (Light)" and cells[1] == "active"
    assert cells[5].startswith("1") and "general-light@" in cells[5], cells  # one worker, named
    assert "UNTRAINED recipe weights: general-light" in browser.find_element(By.ID, "untrained").text
    assert "0 failed after every retry" in browser.find_element(By.ID, "webhooks-summary").text
    assert browser.find_element(By.ID, "dead-summary").text == "0 dead letters."
    # Auto-refresh keeps it current: the "updated" time moves on.
    first = browser.execute_script("return document.body.dataset.loaded")
    wait_until(
        browser, lambda d: d.execute_script("return document.body.dataset.loaded") != first, "a refresh", 30
    )
    screenshot(browser, "ops")


def test_forms_are_labelled_and_keyboard_ordered(gs, browser):
    for page in ("/playground", "/playground/ops"):
        open_page(browser, gs.url + page)
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll("input, select, textarea")]
              .filter(el => el.type !== "hidden" && el.labels.length === 0 && !el.getAttribute("aria-label"))
              .map(el => el.id || el.name);
        """)
        assert unlabelled == [], f"{page}: controls without a label: {unlabelled}"
        assert browser.find_elements(By.CSS_SELECTOR, "[aria-live]"), f"{page} announces status changes"
    open_page(browser, f"{gs.url}/playground")
    # Tab from the top walks the form in reading order.
    browser.execute_script("document.querySelector('.skip-link').focus()")  # the first stop on the page
    order = []
    for _ in range(18):
        ActionChains(browser).send_keys(Keys.TAB).perform()  # to whatever has focus (file inputs too)
        order.append(
            browser.switch_to.active_element.get_attribute("id") or browser.switch_to.active_element.text
        )
    form_order = [
        i
        for i in order
        if i
        in (
            "api-key",
            "image-file",
            "image-url",
            "endpoint",
            "model",
            "operating_resolution",
            "output_format",
            "refine_foreground",
            "output_mask",
            "mask_only",
            "run",
        )
    ]
    assert form_order == [
        "api-key",
        "image-file",
        "image-url",
        "endpoint",
        "model",
        "operating_resolution",
        "output_format",
        "refine_foreground",
        "output_mask",
        "mask_only",
        "run",
    ], order
    # 2304x2304 is offered with General Use (Dynamic) only, as the gateway validates.
    resolutions = Select(browser.find_element(By.ID, "operating_resolution"))
    assert "2304x2304" not in [o.text for o in resolutions.options]
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("General Use (Dynamic)")
    assert "2304x2304" in [o.text for o in resolutions.options]


def test_page_data_endpoints(gs):
    """What the pages read: the endpoints' choices (from the schemas the gateway validates with) and the
    admin-only ops status; the pages themselves are static and carry a strict CSP."""
    with gs.client(None) as anonymous:
        options = anonymous.get("/playground/options.json").json()
        page = anonymous.get("/playground")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert anonymous.get("/playground/ops").status_code == 200
        assert anonymous.get("/playground/secrets.txt").status_code == 404
        assert anonymous.get("/admin/ops/status").status_code == 401
    v1, v2 = options["endpoints"]["v1"], options["endpoints"]["v2"]
    assert v2["app_id"] == "fal-ai/birefnet/v2" and len(v2["fields"]["model"]["choices"]) == 6
    assert v1["fields"]["model"]["choices"] == ["General Use (Light)", "General Use (Heavy)", "Portrait"]
    assert (
        v2["variants"]["General Use (Light)"] == "general-light"
        and v1["variants"]["Portrait"] == "v1-portrait"
    )
    assert "mask_only" in v2["fields"] and "mask_only" not in v1["fields"]
    assert (
        v2["fields"]["refine_foreground"]["default"] is True
        and v2["fields"]["output_format"]["default"] == "png"
    )
    video = options["endpoints"]["v2/video"]  # the page takes a video for this one and plays both outputs
    assert video["app_id"] == "fal-ai/birefnet/v2/video" and video["url_field"] == "video_url"
    assert video["fields"]["video_output_type"]["choices"][:2] == ["X264 (.mp4)", "VP9 (.webm)"]
    assert (
        video["format_field"] == "video_output_type"
        and "media-src *" in page.headers["content-security-policy"]
    )
    with gs.client(ALICE) as client:
        assert client.get("/admin/ops/status").status_code == 403
    with gs.client(OPS) as client:
        status = client.get("/admin/ops/status", params={"minutes": 5, "all": "true"}).json()
    assert status["window_seconds"] == 300 and "general-light" in status["variants"]
    assert len(status["variants"]) > 2, "all=true lists every configured variant"
    assert [w["variants"] for w in status["workers"]] == [["general-light"]]
