"""The web playground in a real browser: `cm-diffusers serve --ui --teacher fashion-mnist-ddpm` (the default
embedded engine, real HTTP on loopback), driven by headless Debian Chromium through selenium. Screenshots land in the
test's temporary folder (and in $CM_DIFFUSERS_SCREENSHOT_DIR when set, which is how docs/images/playground-*.png are
made)."""

import base64
import io
import json
import os
import re
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MODEL = "fashion-mnist-cd"
TEACHER = "fashion-mnist-ddpm"
TEACHER_STEPS = 6  # Heun: 11 network evaluations, about a second on a busy CPU
MODEL_SIZE = (28, 28)
API_KEY = "playground-test-key"
SERVER_START_S = 300
WAIT_S = 120

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser`, or "
                "`apt-get install -y chromium chromium-driver`)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from cm_diffusers.serving.local import LocalServer  # noqa: E402

pytestmark = pytest.mark.slow


def _get(url: str, timeout: float = 5.0, key: str | None = None, json_body: dict | None = None):
    """GET (or POST `json_body`) with an optional Bearer key: (status, body bytes)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if json_body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(json_body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground_server")
    key_file = folder / "keys.txt"
    key_file.write_text(API_KEY + "\n")
    command = ["serve", "--model", MODEL, "--host", "127.0.0.1", "--api_key_file", str(key_file), "--ui",
               "--teacher", TEACHER]  # fmt: skip
    with LocalServer(command, log_path=folder / "server.log", timeout_s=SERVER_START_S) as local:
        yield local.url


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """`cm-diffusers playground --api_url`: the page alone, in front of the server above."""
    folder = tmp_path_factory.mktemp("playground_proxy")
    with LocalServer(["playground", "--api_url", server], log_path=folder / "proxy.log", ready_path="/ui/") as local:
        yield local.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium_profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Debian's chromium as root on a machine with a closed network: these flags keep it from phoning home.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    extra = os.environ.get("CM_DIFFUSERS_SCREENSHOT_DIR")

    def save(driver, name):
        path = folder / f"playground-{name}.png"
        assert driver.save_screenshot(str(path)), f"could not save the screenshot {path}"
        if extra:
            os.makedirs(extra, exist_ok=True)
            shutil.copy(path, os.path.join(extra, path.name))
        return path

    return save


def _decode(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), f"not a PNG data URL: {src[:60]!r}"
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("L"), dtype=np.int16)


def _errors(driver) -> str:
    return " | ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.text)


def _wait_until(driver, condition, what: str, timeout: float = WAIT_S):
    """Wait for `condition`; fail at once, with the page's message, if the page shows an error instead."""
    WebDriverWait(driver, timeout).until(lambda d: condition(d) or _errors(d), message=f"timed out waiting for {what}")
    assert condition(driver), f"the page shows an error instead of {what}: {_errors(driver)}"


def _wait_for_images(driver, container_id: str, count: int = 1) -> list:
    selector = f"#{container_id} img"
    _wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, selector)) >= count,
                f"{count} image(s) in #{container_id}")
    return [_decode(img.get_attribute("src")) for img in driver.find_elements(By.CSS_SELECTOR, selector)]


def _set(driver, element_id: str, value):
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def _open(driver, url: str):
    """Open the page with the test's API key in its storage, as a returning user has it."""
    driver.get(url + "/ui")
    driver.execute_script("localStorage.setItem('cm_diffusers_api_key', arguments[0])", API_KEY)
    driver.refresh()
    _wait_until(driver, lambda d: "28×28" in d.find_element(By.ID, "model-info").text, "the model's description")


def _assert_no_stack_trace(driver):
    source = driver.page_source
    for marker in ("Traceback", 'File "/', "site-packages"):
        assert marker not in source, f"the page shows a stack trace or a path ({marker!r})"


def test_page_is_served_without_a_key(server):
    status, body = _get(server + "/ui/")
    assert status == 200 and b'id="generate"' in body
    status, _ = _get(server + "/v1/models")
    assert status == 401, "the API itself still needs a key"
    status, body = _get(server + "/ui/samples/boot.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    assert _get(server + "/ui/samples/..%2Fplayground.html")[0] == 404


def test_playground_command_forwards_to_a_running_api(proxy):
    status, body = _get(proxy + "/ui/")
    assert status == 200 and b'const API_BASE = "";' in body
    status, body = _get(proxy + "/v1/models")
    assert status == 401 and json.loads(body)["error"]["type"] == "unauthorized", "the API's own answer"
    status, body = _get(proxy + "/v1/models", key=API_KEY)
    assert status == 200 and json.loads(body)["models"][0]["resolution"] == list(MODEL_SIZE)
    status, body = _get(proxy + "/v1/generate", key=API_KEY, json_body={"num_images": 2, "seed": 1})
    assert status == 200 and len(json.loads(body)["images"]) == 2
    status, body = _get(proxy + "/v1/generate", key=API_KEY, json_body={"num_images": 2, "seed": 1, "sigmas": [-1]})
    assert status == 422 and json.loads(body)["error"]["field"] == "sigmas"
    assert _get(proxy + "/etc/passwd")[0] == 404, "only the API's routes are forwarded"


def test_generate_tab(server, browser, screenshots):
    browser.get(server + "/ui")
    # A wrong key: a readable message on the page, no stack trace.
    _set(browser, "api-key", "wrong-key")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "generate-error").text)
    message = browser.find_element(By.ID, "generate-error").text
    assert "API key" in message and "401" in message, message
    _assert_no_stack_trace(browser)

    _set(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "api-key").send_keys("\t")  # the change event stores the key, loads the model
    _wait_until(browser, lambda d: "28×28" in d.find_element(By.ID, "model-info").text, "the model's description")
    browser.refresh()  # the key survives a reload (localStorage)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY
    _wait_until(browser, lambda d: "28×28" in d.find_element(By.ID, "model-info").text, "the model's description")

    # A limit: the API's 4xx names the field, and the page shows it.
    _set(browser, "gen-num", 100000)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "generate-error").text)
    message = browser.find_element(By.ID, "generate-error").text
    assert "num_images" in message, message
    _assert_no_stack_trace(browser)

    _set(browser, "gen-num", 4)
    _set(browser, "gen-seed", 7)
    browser.find_element(By.ID, "generate").click()
    images = _wait_for_images(browser, "result", 4)
    assert len(images) == 4
    for image in images:
        assert image.shape == MODEL_SIZE
        assert image.std() > 10, "a blank image"
    assert "ms" in browser.find_element(By.ID, "latency").text
    assert browser.find_element(By.ID, "nfe").text == "1"

    # The same seed gives the same images (the page sends it; the server honours it).
    browser.execute_script("document.getElementById('result').innerHTML = ''")
    browser.find_element(By.ID, "generate").click()
    again = _wait_for_images(browser, "result", 4)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))

    # The schedule the model card recommends (2 steps for fashion-mnist-cd) is one choice of the steps menu.
    Select(browser.find_element(By.ID, "gen-steps")).select_by_value("card:0")
    _set(browser, "gen-num", 8)
    browser.execute_script("document.getElementById('result').innerHTML = ''")
    browser.find_element(By.ID, "generate").click()
    images = _wait_for_images(browser, "result", 8)
    assert all(image.shape == MODEL_SIZE and image.std() > 10 for image in images)
    assert browser.find_element(By.ID, "nfe").text == "2"
    screenshots(browser, "generate")


def test_compare_tab(server, browser, screenshots):
    _open(browser, server)
    browser.find_element(By.ID, "tab-compare").click()
    _set(browser, "compare-seed", 3)
    # The server has a teacher (`--teacher`): the page offers its steps and puts it in the comparison.
    assert browser.find_element(By.ID, "compare-teacher-steps-label").is_displayed()
    _set(browser, "compare-teacher-steps", TEACHER_STEPS)
    browser.find_element(By.ID, "compare-run").click()
    # Compare runs its requests one after another; the button is enabled again when all are done.
    _wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-result figure")) >= 5
                and d.find_element(By.ID, "compare-run").is_enabled(), "the comparison", timeout=WAIT_S * 2)
    figures = browser.find_elements(By.CSS_SELECTOR, "#compare-result figure")
    captions = [figure.find_element(By.TAG_NAME, "figcaption").text for figure in figures]
    for steps, caption in zip((1, 2, 3, 4), captions):
        assert f"NFE {steps}" in caption and "ms" in caption, caption
    images = [_decode(figure.find_element(By.TAG_NAME, "img").get_attribute("src")) for figure in figures]
    assert all(image.shape == MODEL_SIZE for image in images)
    teacher = [i for i, caption in enumerate(captions) if "teacher" in caption]
    assert len(teacher) == 1 and teacher[0] == len(figures) - 1, captions
    caption = captions[teacher[0]]
    assert TEACHER in caption and f"{TEACHER_STEPS} Heun steps" in caption, caption
    assert re.search(r"\d+(\.\d+)? ms", caption) and f"NFE {2 * TEACHER_STEPS - 1}" in caption, caption
    assert images[teacher[0]].std() > 10, "a blank teacher image"
    screenshots(browser, "compare")


def test_edit_tab_inpaints_the_painted_mask(server, browser, screenshots):
    _open(browser, server)
    browser.find_element(By.ID, "tab-edit").click()
    browser.find_element(By.ID, "sample-boot").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script("return editSource !== null"))

    # Run with an empty mask first: a readable message, no request.
    browser.find_element(By.ID, "edit-run").click()
    assert "mask is empty" in browser.find_element(By.ID, "edit-error").text

    # Paint a thick horizontal band over the middle of the image with the mouse.
    mask = browser.find_element(By.ID, "edit-mask")
    width = mask.size["width"]
    actions = ActionChains(browser)
    actions.move_to_element_with_offset(mask, -width // 3, 0).click_and_hold()
    for _ in range(8):
        actions.move_by_offset(width // 12, 0)
    actions.move_by_offset(0, width // 12)
    for _ in range(8):
        actions.move_by_offset(-width // 12, 0)
    actions.release().perform()

    browser.find_element(By.ID, "edit-run").click()
    (result,) = _wait_for_images(browser, "edit-result")
    sent = _decode(browser.find_element(By.CSS_SELECTOR, "#edit-sent img").get_attribute("src"))
    painted = _decode(browser.execute_script("return maskCanvas().canvas.toDataURL('image/png')")) > 127
    assert result.shape == sent.shape == painted.shape == MODEL_SIZE
    assert 20 < painted.sum() < 0.8 * painted.size, f"the painted mask covers {painted.sum()} pixels"
    # Inpainting keeps every unpainted pixel (up to the uint8 round trip) and regenerates the painted ones.
    assert np.abs(result - sent)[~painted].max() <= 2
    assert np.abs(result - sent)[painted].mean() > 1.0
    assert "NFE" in browser.find_element(By.ID, "edit-latency").text
    screenshots(browser, "edit")
    _assert_no_stack_trace(browser)


def test_edit_tab_super_resolves_and_rejects_a_bad_upload(server, browser, tmp_path):
    _open(browser, server)
    browser.find_element(By.ID, "tab-edit").click()
    # A file that is not an image: a readable message, and the previous image stays.
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    browser.find_element(By.ID, "edit-upload").send_keys(str(not_an_image))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "edit-error").text)
    assert "not an image" in browser.find_element(By.ID, "edit-error").text

    browser.find_element(By.ID, "sample-trouser").click()
    Select(browser.find_element(By.ID, "edit-task")).select_by_value("super-resolve")
    Select(browser.find_element(By.ID, "edit-scale")).select_by_value("4")
    browser.execute_script("document.getElementById('edit-result').innerHTML = ''")
    browser.find_element(By.ID, "edit-run").click()
    (result,) = _wait_for_images(browser, "edit-result")
    low = _decode(browser.find_element(By.CSS_SELECTOR, "#edit-sent img").get_attribute("src"))
    assert result.shape == MODEL_SIZE and low.shape == (MODEL_SIZE[0] // 4, MODEL_SIZE[1] // 4)
    # Super-resolution keeps the mean of every 4x4 patch, except where the result is clamped to the pixel range
    # (all-black patches, a few bright ones): compare the others, up to the uint8 round trip.
    means = result.reshape(low.shape[0], 4, low.shape[1], 4).mean(axis=(1, 3))
    unsaturated = (low > 0) & (low < 255)
    assert unsaturated.sum() >= 8
    assert np.mean(np.abs(means - low)[unsaturated] <= 1) >= 0.9, (low, means.round())
    assert not browser.find_element(By.ID, "edit-error").text
