"""`vaelab serve`'s page in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium), with the network disabled: every host but the local server goes to a dead proxy.

.ci/run installs chromium with apt where it is missing, so CI runs this test; elsewhere it is
skipped without them. VAELAB_SERVE_RUN=RUN VAELAB_SERVE_SCREENSHOT=docs/serve.png serves a real
run instead of the tiny one and saves the screenshot there (docs/serve.md).
"""

import hashlib
import io
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.serve_runs import make_cvae_run, make_runs
from vaelab import serve

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # the dev extra is not installed
    webdriver = None

MISSING = [
    what
    for what, found in (
        ("chromium", CHROMIUM),
        ("chromium-driver", DRIVER),
        ("selenium", webdriver),
    )
    if not found
]
if MISSING and os.environ.get("CI"):  # CI installs them (.ci/run): never skip there
    pytest.fail(f"CI lacks {', '.join(MISSING)}", pytrace=False)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")


def chromium_processes(profile: Path) -> list[int]:
    """Processes whose command line names our browser profile (the browser and its helpers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(profile).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue  # ended meanwhile
    return found


def wait_for(driver, script, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


PIXELS = """
const img = arguments[0];
const c = document.createElement("canvas");
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
return Array.from(ctx.getImageData(0, 0, c.width, c.height).data).join(",");
"""


def pixels(driver, img) -> str:
    return hashlib.sha256(driver.execute_script(PIXELS, img).encode()).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    given = os.environ.get("VAELAB_SERVE_RUN")
    if given:
        run_dirs = [Path(p) for p in given.split(",")]
    else:
        made = make_runs(tmp_path_factory.mktemp("serve-browser"))
        run_dirs = [made["vae"], made["decoder_only"]]
    with serve.serving(serve.load_runs(run_dirs)) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        f"--user-data-dir={profile}", "--window-size=1500,1250", "--hide-scrollbars",
        # The network disabled: every request goes to a dead proxy (port 9, discard), except
        # those for the local server. Chromium never sends loopback through a proxy anyway.
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-default-apps",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        # nothing left behind: the driver, the browser and its helpers have exited
        deadline = time.monotonic() + 10
        while chromium_processes(profile) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert chromium_processes(profile) == []
        assert service.process is None or service.process.poll() is not None


def test_page_moves_a_slider_uploads_an_image_and_needs_no_network(served, browser, tmp_path):
    driver = browser
    driver.get(served)
    wait_for(driver, "return document.body.dataset.ready === 'true'")
    panel = driver.find_element(By.CSS_SELECTOR, ".panel")
    decoded = panel.find_element(By.CSS_SELECTOR, '[data-r="decoded"]')
    wait_for(driver, "return document.querySelector('.panel [data-r=decoded]').dataset.serial")
    before = pixels(driver, decoded)

    # move the most active dimension's slider as a user would (an input event per move)
    slider = panel.find_element(By.CSS_SELECTOR, ".sliders input[type=range]")
    serial = int(decoded.get_attribute("data-serial"))
    driver.execute_script(
        "arguments[0].value = 2.5; arguments[0].dispatchEvent(new Event('input'));", slider
    )
    serial_now = "Number(document.querySelector('.panel [data-r=decoded]').dataset.serial)"
    wait_for(driver, f"return {serial_now} > {serial}")
    assert pixels(driver, decoded) != before

    # upload an image: its reconstruction and where it sits in the latent space
    # (the last validation image offered, enlarged 4x: the server shrinks it back)
    run = panel.get_attribute("data-run")
    index = driver.execute_script(
        "return [...document.querySelectorAll('.panel .thumbs img')].pop().dataset.val"
    )
    with urllib.request.urlopen(f"{served}api/val?run={run}&index={index}") as response:
        small = Image.open(io.BytesIO(response.read()))
        picture = tmp_path / "mine.png"
        small.resize((small.width * 4, small.height * 4), Image.Resampling.NEAREST).save(picture)
    panel.find_element(By.CSS_SELECTOR, '[data-r="file"]').send_keys(str(picture))
    wait_for(driver, "return document.querySelector('.panel [data-r=recon]').dataset.serial")
    recon = panel.find_element(By.CSS_SELECTOR, '[data-r="recon"]')
    assert driver.execute_script("return arguments[0].naturalWidth", recon) > 0
    seen = panel.find_element(By.CSS_SELECTOR, '[data-r="seen"]').get_attribute("src")
    assert seen.startswith("data:image/png;base64,")
    wait_for(driver, "return document.querySelector('.panel [data-r=scatter-caption]')"
             ".textContent.includes('yours')")  # fmt: skip
    assert not panel.find_element(By.CSS_SELECTOR, '[data-r="use"]').get_attribute("disabled")
    # the samples and the walk between two validation images are drawn too
    for name in ("samples", "strip"):
        wait_for(driver, f"return document.querySelector('.panel [data-r={name}]').dataset.serial")
    assert panel.find_element(By.CSS_SELECTOR, '[data-r="error"]').get_attribute("hidden")

    # nothing was asked of any other host, and none could have been: a request out fails
    origin = served.rstrip("/")
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert resources and all(name.startswith(origin) for name in resources), resources
    blocked = driver.execute_async_script(
        "const done = arguments[0];"
        "fetch('http://example.com/').then(() => done('reached'), () => done('blocked'));"
    )
    assert blocked == "blocked"
    severe = [
        e for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "example.com" not in e["message"]
    ]  # fmt: skip
    assert severe == []
    # the stylesheet from the package applies (the page is not unstyled)
    assert (
        driver.execute_script(
            "return getComputedStyle(document.querySelector('.panel')).borderRadius"
        )
        == "8px"
    )

    out = Path(os.environ.get("VAELAB_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(out))
    with Image.open(out) as shot:
        assert shot.size[0] >= 1000 and shot.size[1] >= 800


def test_decoder_only_panel_has_sliders_and_no_upload(served, browser):
    if os.environ.get("VAELAB_SERVE_RUN"):
        pytest.skip("serves the given runs only")
    driver = browser
    driver.get(served)
    wait_for(driver, "return document.body.dataset.ready === 'true'")
    panel = driver.find_element(By.CSS_SELECTOR, '.panel[data-run="decoder_only"]')
    assert len(panel.find_elements(By.CSS_SELECTOR, ".sliders input[type=range]")) == 3
    assert panel.find_element(By.CSS_SELECTOR, '[data-r="file"]').get_attribute("disabled")
    assert "no encoder" in panel.find_element(By.CSS_SELECTOR, '[data-r="upload-note"]').text


def test_a_cvae_panel_decodes_what_its_condition_says(browser, tmp_path):
    """A conditional run gets a choice per variable (here the digit, starting at the data's
    most common); choosing another re-decodes the sliders' image, the samples and an upload's
    reconstruction under it."""
    if os.environ.get("VAELAB_SERVE_RUN"):
        pytest.skip("serves the given runs only")
    run = make_cvae_run(tmp_path)
    driver = browser
    with serve.serving(serve.load_runs([run])) as url:
        driver.get(url)
        wait_for(driver, "return document.body.dataset.ready === 'true'")
        panel = driver.find_element(By.CSS_SELECTOR, '.panel[data-run="cvae"]')
        choice = panel.find_element(By.CSS_SELECTOR, 'select[data-variable="label"]')
        assert panel.find_element(By.CSS_SELECTOR, '[data-r="condition-box"]').is_displayed()
        # an upload first: its reconstruction is redrawn under the new condition too
        picture = tmp_path / "digit.png"
        with urllib.request.urlopen(f"{url}api/val?run=cvae&index=0") as response:
            Image.open(io.BytesIO(response.read())).resize((32, 32)).save(picture)
        panel.find_element(By.CSS_SELECTOR, '[data-r="file"]').send_keys(str(picture))
        images = {}
        for name in ("decoded", "samples", "recon"):
            wait_for(
                driver, f"return document.querySelector('.panel [data-r={name}]').dataset.serial"
            )
            images[name] = panel.find_element(By.CSS_SELECTOR, f'[data-r="{name}"]')
        before = {name: pixels(driver, img) for name, img in images.items()}
        serials = {name: int(img.get_attribute("data-serial")) for name, img in images.items()}
        other = "3" if choice.get_attribute("value") != "3" else "4"
        driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'));",
            choice, other,
        )  # fmt: skip
        for name, img in images.items():
            now = f"Number(document.querySelector('.panel [data-r={name}]').dataset.serial)"
            wait_for(driver, f"return {now} > {serials[name]}")
            assert pixels(driver, img) != before[name], name
        assert panel.find_element(By.CSS_SELECTOR, '[data-r="error"]').get_attribute("hidden")
