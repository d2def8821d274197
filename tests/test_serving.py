"""The serving API end to end: a real `cm-diffusers serve` (real HTTP on loopback) started once per engine for this
module (the embedded engine, and Ray Serve with its own Ray instance), each in its own process group, on the shipped
fashion-mnist-cd with fashion-mnist-ddpm as its teacher; every HTTP test runs against both. Plus the model deployment
class on a tiny RGB class-conditional model, called directly, for what the shipped model cannot show."""

import asyncio
import base64
import gzip
import io
import json
import os
import re
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")
requests = pytest.importorskip("requests")

from cm_diffusers import ConsistencyPipeline  # noqa: E402
from cm_diffusers.serving import APIError, Client  # noqa: E402
from cm_diffusers.serving.local import LocalServer  # noqa: E402
from cm_diffusers.serving.schemas import EDIT_TASKS  # noqa: E402

KEY, OTHER_KEY, LIGHT_KEY = "test-key-aaaaaaaaaaaaaaaa", "test-key-bbbbbbbbbbbbbbbb", "test-key-cccccccccccccccc"
MODEL = "fashion-mnist-cd"
TEACHER = "fashion-mnist-ddpm"
MAX_BATCH = 16
FORTY_SIGMAS = np.geomspace(80.0, 0.01, 40).round(6).tolist()  # the most steps a request may ask for
RATE_LIMIT = 150  # per minute and key: the rate-limit test spends OTHER_KEY's allowance, KEY stays far below it


ENGINES = [e for e in os.environ.get("CM_SERVE_TEST_ENGINES", "embedded,ray").split(",") if e]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory):
    """`cm-diffusers serve --engine ENGINE` in its own process group (LocalServer: SIGTERM to the serve process at the
    end, which drains and, with Ray, shuts its Ray instance down, then SIGKILL to whatever of the group is left). The
    key file has a byte order mark and a comment after a key: both keys work."""
    folder = tmp_path_factory.mktemp(f"serve-{request.param}")
    key_file = folder / "keys.txt"
    key_file.write_bytes(f"\ufeff{KEY}  # the main test key\n# another\n{OTHER_KEY}\n{LIGHT_KEY}\n".encode("utf-8"))
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIFFUSERS_API_KEYS="")
    ray = ["--ray_ports_beyond_loopback"] if request.param == "ray" else []  # a deliberate, tested choice (below)
    command = ["serve", "--engine", request.param, *ray, "--model", MODEL, "--api_key_file", str(key_file),
               "--max_batch_size", str(MAX_BATCH), "--batch_wait_ms", "20", "--rate_limit", str(RATE_LIMIT),
               "--max_images", "48", "--device", "cpu", "--teacher", TEACHER]  # fmt: skip
    with LocalServer(command, log_path=folder / "server.log", env=env) as local:
        yield {"url": local.url, "process": local.process, "log": folder / "server.log", "engine": request.param}


@pytest.fixture(scope="module")
def pipe():
    pipe = ConsistencyPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _post(server, payload, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server["url"] + "/v1/generate", json=payload, headers=headers, timeout=120, **kwargs)


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _expected(pipe, num_images, seed, **schedule) -> np.ndarray:
    images = pipe(batch_size=num_images, generator=torch.Generator().manual_seed(seed), output_type="np",
                  **schedule).images
    return (images[..., 0] * 255).round().astype(np.uint8)


def _assert_same_images(got: np.ndarray, expected: np.ndarray):
    """Equal images, up to what the float kernels allow: CPU convolutions round differently at different batch
    sizes (~5e-6 on the UNet's output), which can move a rare uint8 pixel by one grey level."""
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{(diff > 0).sum()} pixels differ, max {diff.max()}"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_error(response, status, field):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["field"] == field, body
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text and "/work" not in response.text and ".py" not in response.text


# ----------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_returns_pngs_equal_to_the_pipeline(server, pipe):
    response = _post(server, {"num_images": 3, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 7 and body["model"] == MODEL and body["nfe"] == 1 and body["latency_ms"] > 0
    images = np.stack([_decode(b64) for b64 in body["images"]])
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, _expected(pipe, 3, 7))

    two_step = _post(server, {"num_images": 2, "seed": 3, "timesteps": [11, 0]}).json()
    assert two_step["nfe"] == 2
    np.testing.assert_array_equal(np.stack([_decode(b) for b in two_step["images"]]),
                                  _expected(pipe, 2, 3, timesteps=[11, 0]))
    unseeded = _post(server, {}).json()
    assert isinstance(unseeded["seed"], int)
    np.testing.assert_array_equal(_decode(unseeded["images"][0]), _expected(pipe, 1, unseeded["seed"])[0])


def test_burst_of_64_concurrent_seeded_requests_equals_unbatched_pipeline(server, pipe):
    """Mixed sizes and schedules (1 step, 2 steps, explicit sigmas) in one burst: all 200, every image equal to the
    pipeline's for that request alone, and the server formed batches of several requests."""
    schedules = [{}, {"timesteps": [11, 0]}, {"sigmas": [80.0, 1.0]}]
    payloads = [{"num_images": 1 + i % 3, "seed": 1000 + i, **schedules[i % 3]} for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda p: _post(server, p), payloads))
    assert [r.status_code for r in responses] == [200] * 64
    got, expected = [], []
    for payload, response in zip(payloads, responses):
        schedule = {k: v for k, v in payload.items() if k in ("timesteps", "sigmas")}
        got += [_decode(b) for b in response.json()["images"]]
        expected.append(_expected(pipe, payload["num_images"], payload["seed"], **schedule))
    # over the whole burst: one flipped grey level is 1/784 of a single 28x28 image, but must stay rare overall
    _assert_same_images(np.stack(got), np.concatenate(expected))
    metrics = requests.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    batches = float(re.search(r"^cm_batch_size_requests_count (\S+)", metrics, re.M).group(1))
    single = float(re.search(r'^cm_batch_size_requests_bucket\{le="1.0"\} (\S+)', metrics, re.M).group(1))
    assert batches > single, "no batch held more than one request"


def test_request_larger_than_the_batch_limit_is_split_and_still_exact(server, pipe):
    # 40 images over max_batch_size 16: three forward passes per step, 2 steps (the re-noising draws are shared).
    response = _post(server, {"num_images": 40, "seed": 11, "timesteps": [11, 0]})
    assert response.status_code == 200, response.text
    got = np.stack([_decode(b) for b in response.json()["images"]])
    _assert_same_images(got, _expected(pipe, 40, 11, timesteps=[11, 0]))


def test_teacher_generates_what_sample_teacher_gives_offline_from_the_same_noise(server, pipe):
    """`serve --teacher`: the same seed starts the teacher from the consistency model's noise; 4 Heun steps cost 7
    network evaluations; the images equal `sample_teacher`'s offline."""
    from cm_diffusers import load_teacher
    from cm_diffusers.teacher_sampling import sample_teacher

    url, headers = server["url"] + "/v1/teacher/generate", {"Authorization": f"Bearer {KEY}"}
    response = requests.post(url, json={"num_images": 2, "seed": 5, "num_inference_steps": 4}, headers=headers,
                             timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 5 and body["model"] == TEACHER and body["nfe"] == 7 and body["latency_ms"] > 0
    got = np.stack([_decode(b64) for b64 in body["images"]])
    assert got.shape == (2, 28, 28) and got.dtype == np.uint8
    output = sample_teacher(load_teacher(TEACHER), pipe.prepare_latents(2, torch.Generator().manual_seed(5)), "heun",
                            nfe=7)
    assert output.nfe == 7
    _assert_same_images(got, (pipe.postprocess(output.sample, "np")[..., 0] * 255).round().astype(np.uint8))

    model = requests.get(server["url"] + "/v1/models", headers=headers).json()["models"][0]
    assert model["teacher"] == TEACHER and model["teacher_endpoint"] == "/v1/teacher/generate"
    assert model["limits"]["max_teacher_steps"] == 50

    def post(payload):
        return requests.post(url, json=payload, headers=headers, timeout=120)

    _assert_error(post({"num_inference_steps": 51}), 422, "num_inference_steps")
    _assert_error(post({"num_inference_steps": 0}), 422, "num_inference_steps")
    _assert_error(post({"timesteps": [11, 0]}), 422, "timesteps")
    _assert_error(post({"num_images": 10**6}), 422, "num_images")
    _assert_error(requests.post(url, json={"seed": 0}), 401, None)


# ----------------------------------------------------------------------------------------------------------------
# Security, limits, errors


def test_api_key_is_required_on_the_api_but_not_on_health(server):
    _assert_error(_post(server, {"seed": 0}, key=None), 401, None)
    _assert_error(_post(server, {"seed": 0}, key="wrong-key-cccccccccccccccc"), 401, None)
    assert requests.get(server["url"] + "/v1/models").status_code == 401
    assert requests.get(server["url"] + "/metrics").status_code == 401
    assert requests.get(server["url"] + "/healthz").json() == {"status": "ok"}
    assert requests.get(server["url"] + "/readyz").json() == {"status": "ready"}
    paths = requests.get(server["url"] + "/openapi.json").json()["paths"]
    assert paths.keys() >= {"/v1/generate", "/v1/teacher/generate", *(f"/v1/edit/{task}" for task in EDIT_TASKS)}


def test_bad_inputs_get_422_naming_the_field(server):
    _assert_error(_post(server, {"num_inference_steps": -1}), 422, "num_inference_steps")
    _assert_error(_post(server, {"num_images": 10**6}), 422, "num_images")
    _assert_error(_post(server, {"num_images": 0}), 422, "num_images")
    _assert_error(_post(server, {"timesteps": [0, 11]}), 422, "timesteps")
    _assert_error(_post(server, {"sigmas": [80.0, 200.0]}), 422, "sigmas")
    _assert_error(_post(server, {"class_labels": 3}), 422, "class_labels")  # the model is unconditional
    _assert_error(_post(server, {"output_format": "bmp"}), 422, "output_format")
    _assert_error(_post(server, {"num_imagez": 2}), 422, "num_imagez")
    _assert_error(_post(server, {"num_inference_steps": 10**4}), 422, "num_inference_steps")
    prompt = _post(server, {"prompt": "a shirt"})  # a pixel model: never silently ignored
    _assert_error(prompt, 422, "prompt")
    assert "without a prompt" in prompt.json()["error"]["message"]
    too_big = requests.post(server["url"] + "/v1/generate", data=b"{" + b" " * 100_000 + b"}",
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _assert_error(too_big, 413, "body")


def test_edit_uploads_are_validated(server):
    url, headers = server["url"] + "/v1/edit/", {"Authorization": f"Bearer {KEY}"}
    image = _png(np.zeros((28, 28), dtype=np.uint8))
    not_image = requests.post(url + "inpaint", headers=headers,
                              files={"image": ("a.png", b"not an image at all"), "mask": ("m.png", image)})
    _assert_error(not_image, 422, "image")
    wrong_mask = requests.post(url + "inpaint", headers=headers, files={
        "image": ("a.png", image), "mask": ("m.png", _png(np.zeros((14, 14), dtype=np.uint8)))})
    _assert_error(wrong_mask, 422, "mask")
    _assert_error(requests.post(url + "inpaint", headers=headers, files={"image": ("a.png", image)}), 422, "mask")
    wrong_size = requests.post(url + "denoise", headers=headers, data={"sigma": "0.5"},
                               files={"image": ("a.png", _png(np.zeros((20, 20), dtype=np.uint8)))})
    _assert_error(wrong_size, 422, "image")
    _assert_error(requests.post(url + "super-resolve", headers=headers, files={"image": ("a.png", image)}), 422,
                  "scale_factor")
    _assert_error(requests.post(url + "colorize", headers=headers, files={"image": ("a.png", image)}), 422, "task")
    _assert_error(requests.post(url + "sharpen", headers=headers, files={"image": ("a.png", image)}), 404, "task")
    _assert_error(requests.post(url + "denoise", headers=headers, data={"sigma": "-1"},
                                files={"image": ("a.png", image)}), 422, "sigma")


def test_rate_limit_answers_429_with_retry_after(server):
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    with requests.Session() as session:
        for _ in range(RATE_LIMIT + 40):
            response = session.get(server["url"] + "/v1/models", headers=headers)
            if response.status_code == 429:
                break
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1 and response.json()["error"]["type"] == "rate_limited"
    assert _post(server, {"seed": 0}).status_code == 200  # per key: KEY is unaffected


def test_request_ids_metrics_and_models(server):
    response = requests.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                                  "X-Request-ID": "my-request-42"})
    assert response.headers["X-Request-ID"] == "my-request-42"
    model = response.json()["models"][0]
    assert model["name"] == MODEL and model["resolution"] == [28, 28] and model["channels"] == 1
    from cm_diffusers.model_card import load_card_info
    from cm_diffusers.shipped_models import resolve_pretrained

    card_schedule = load_card_info(resolve_pretrained(MODEL))["sampling"]  # what the shipped card recommends
    assert model["num_classes"] is None and card_schedule in model["recommended_schedules"]
    assert "colorize" not in model["edit_tasks"] and model["max_batch_size"] == MAX_BATCH

    metrics = requests.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    ok = float(re.search(r'^cm_requests_total\{route="/v1/generate",status="200"\} (\S+)', text, re.M).group(1))
    assert ok >= 64
    assert re.search(r'^cm_requests_total\{route="/v1/generate",status="401"\} [1-9]', text, re.M)
    assert re.search(r'^cm_images_generated_total\{route="/v1/generate"\} (\d+)', text, re.M)
    for name in ("cm_request_latency_seconds_bucket", "cm_queue_wait_seconds_count", "cm_batch_size_images_count",
                 "cm_errors_total", "cm_requests_in_flight"):
        assert name in text
    # The JSON access log line carries the id; Ray streams the replica's stderr to the server's output with a delay.
    deadline = time.monotonic() + 20
    while '"request_id": "my-request-42"' not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    line = next(line for line in server["log"].read_text().splitlines() if '"request_id": "my-request-42"' in line)
    entry = json.loads(line[line.index("{"):])
    assert entry["status"] == 200 and entry["route"] == "/v1/models" and entry["key"] and KEY not in line


def test_every_bad_input_class_gets_a_4xx_naming_its_field(server):
    """Numbers too large for the model's integer types, infinities, non-finite or out-of-range values, in JSON and in
    edit forms: a 4xx naming the field, never a 500."""
    for payload, field in [({"timesteps": [10**20]}, "timesteps"), ({"timesteps": [10**38, 0]}, "timesteps"),
                           ({"sigmas": [1e308]}, "sigmas"), ({"seed": 10**30}, "seed"),
                           ({"class_labels": 10**20}, "class_labels"), ({"num_images": 10**40}, "num_images"),
                           ({"num_inference_steps": 10**30}, "num_inference_steps"),
                           ({"timesteps": [11, 0], "sigmas": [80.0]}, "body")]:
        response = _post(server, payload)
        assert response.status_code == 422, (payload, response.text)
        assert response.json()["error"]["field"] == field, (payload, response.text)
    url, headers = server["url"] + "/v1/edit/", {"Authorization": f"Bearer {KEY}"}
    image = _png(np.zeros((28, 28), dtype=np.uint8))
    for task, data, field in [("inpaint", {"timesteps": "100000000000000000000"}, "timesteps"),
                              ("inpaint", {"timesteps": "99999999999"}, "timesteps"),
                              ("inpaint", {"sigmas": "1e308"}, "sigmas"), ("inpaint", {"sigmas": "inf"}, "sigmas"),
                              ("inpaint", {"class_labels": "99999999999"}, "class_labels"),
                              ("denoise", {"sigma": "1e308"}, "sigma"), ("denoise", {"sigma": "inf"}, "sigma"),
                              ("denoise", {"sigma": "1000"}, "sigma"), ("denoise", {"sigma": "nan"}, "sigma"),
                              ("super-resolve", {"scale_factor": str(10**30)}, "scale_factor")]:
        files = {"image": ("a.png", image if task != "super-resolve" else _png(np.zeros((14, 14), np.uint8)))}
        if task == "inpaint":
            files["mask"] = ("m.png", image)
        _assert_error(requests.post(url + task, headers=headers, data=data, files=files), 422, field)


def test_unreadable_images_bombs_and_unknown_form_fields(server):
    url, headers = server["url"] + "/v1/edit/", {"Authorization": f"Bearer {KEY}"}
    image = _png(np.zeros((28, 28), dtype=np.uint8))
    lab = io.BytesIO()
    Image.new("LAB", (28, 28)).save(lab, format="TIFF")  # PIL opens it, but cannot convert it to grayscale directly
    lab_files = ({"image": ("a.tiff", lab.getvalue())},
                 {"image": ("a.png", image), "mask": ("m.tiff", lab.getvalue())})
    for files in lab_files:
        response = requests.post(url + ("inpaint" if "mask" in files else "denoise"), headers=headers, files=files,
                                 data={} if "mask" in files else {"sigma": "0.5"})
        assert response.status_code == 200, response.text  # read as RGB, then as the model's grayscale
    _assert_error(requests.post(url + "denoise", headers=headers, data={"sigma": "0.5"},
                                files={"image": ("a.png", b"\x89PNG\r\n\x1a\n" + image[8:40])}), 422, "image")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # ~50 KB, 400 Mpixels
    assert len(bomb.getvalue()) < 100_000
    _assert_error(requests.post(url + "denoise", headers=headers, data={"sigma": "0.5"},
                                files={"image": ("bomb.png", bomb.getvalue())}), 413, "image")
    _assert_error(requests.post(url + "denoise", headers=headers, data={"sigma": "0.5", "sed": "3"},
                                files={"image": ("a.png", image)}), 422, "sed")
    with pytest.raises(APIError) as error:
        Client(server["url"], api_key=KEY).edit("denoise", Image.fromarray(np.zeros((28, 28), np.uint8)), sigma=0.5,
                                                sed=3)
    assert error.value.status == 422 and error.value.field == "sed"
    _assert_error(requests.post(url + "stroke", headers=headers, data={"num_inference_steps": "2"},
                                files={"image": ("a.png", image)}), 422, "num_inference_steps")


def test_unparsable_bodies_get_clear_errors_naming_the_body(server):
    def post(data, content_type="application/json", **headers):
        return requests.post(server["url"] + "/v1/generate", data=data, timeout=60, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": content_type, **headers})

    not_json = post(b"{oops")
    _assert_error(not_json, 400, "body")
    assert "JSON" in not_json.json()["error"]["message"] and '"0"' not in not_json.text
    empty = post(b"")
    _assert_error(empty, 422, "body")
    assert "required" in empty.json()["error"]["message"]
    _assert_error(post(b'{"seed": 1}', "text/plain"), 415, "body")
    _assert_error(post(gzip.compress(b'{"seed": 1}'), **{"Content-Encoding": "gzip"}), 415, "body")
    _assert_error(post(b"[" * 1000 + b"]" * 1000), 400, "body")
    _assert_error(post(b"[1, 2]"), 422, "body")


def test_request_ids_agree_in_header_body_and_log(server):
    for sent in ("has space", "x" * 200, "caf\u00e9", ""):
        response = requests.post(server["url"] + "/v1/generate", json={"num_images": 0}, timeout=60, headers={
            "Authorization": f"Bearer {KEY}", "X-Request-ID": sent.encode("utf-8")})
        assert response.status_code == 422
        request_id = response.headers["X-Request-ID"]
        assert response.json()["request_id"] == request_id and re.fullmatch(r"[\x21-\x7e]{1,128}", request_id)
        assert request_id != sent
        _wait_for_log(server, request_id)


def test_open_routes_answer_head_and_other_methods_get_405_with_allow(server):
    for path in ("/healthz", "/readyz"):
        assert requests.head(server["url"] + path, timeout=30).status_code == 200
    response = requests.put(server["url"] + "/healthz", timeout=30)
    assert response.status_code == 405 and set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_client_ready_is_false_when_the_server_is_down_and_retry_after_is_an_int(server):
    from cm_diffusers.serving.local import free_port

    assert Client(f"http://127.0.0.1:{free_port()}", timeout=5).ready() is False
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    with requests.Session() as session:  # spends OTHER_KEY's allowance, as the rate-limit test does
        while session.get(server["url"] + "/v1/models", headers=headers, timeout=30).status_code != 429:
            pass
    with pytest.raises(APIError) as error:
        Client(server["url"], api_key=OTHER_KEY).models()
    assert error.value.status == 429 and isinstance(error.value.retry_after, int) and error.value.retry_after >= 1


def test_a_client_that_goes_away_is_logged_once_as_499_and_its_work_is_dropped(server):
    """A heavy request (48 images x 40 steps = 120 forward passes of 16 rows) whose client gives up after 1 s: the
    request is counted and logged once, with status 499 (no 500), and its remaining forward passes are not run."""
    before = _metrics(server)
    request_id = "gone-" + uuid.uuid4().hex
    with pytest.raises(requests.Timeout):
        requests.post(server["url"] + "/v1/generate", json={"num_images": 48, "sigmas": FORTY_SIGMAS, "seed": 0},
                      headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": request_id}, timeout=1.0)
    time.sleep(2.0)
    settled = _metrics(server)
    time.sleep(2.0)
    after = _metrics(server)
    full = 48 * 40
    assert after["cm_model_network_evaluations"] == settled["cm_model_network_evaluations"], "work went on"
    assert after["cm_model_network_evaluations"] - before["cm_model_network_evaluations"] < full / 2
    assert after["cm_model_cancelled_requests"] >= before["cm_model_cancelled_requests"] + 1
    assert after.get('cm_requests_total{route="/v1/generate",status="500"}', 0) == 0
    assert after['cm_requests_total{route="/v1/generate",status="499"}'] >= 1
    lines = _wait_for_log(server, request_id)
    assert len(lines) == 1 and lines[0]["status"] == 499


def test_a_light_request_waits_about_one_forward_pass_behind_a_heavy_one_from_another_key(server):
    """Key A asks for the most the limits allow (48 images x 40 steps: 120 forward passes of the batch limit, 16
    rows); key B then asks for 1 image. B's answer comes within 4 forward passes of the batch limit (measured from
    A's own time per pass) plus 0.5 s, long before A's; a second request from A meanwhile is refused (429: A already
    holds its share of admitted work)."""
    results = {}

    def heavy():
        results["a"] = _post(server, {"num_images": 48, "sigmas": FORTY_SIGMAS, "seed": 0})

    thread = threading.Thread(target=heavy)
    thread.start()
    time.sleep(1.5)
    started = time.perf_counter()
    light = _post(server, {"num_images": 1, "seed": 1}, key=LIGHT_KEY)
    light_s = time.perf_counter() - started
    over = _post(server, {"num_images": 1, "seed": 2})  # key A already holds a maximal request's cost
    thread.join(300)
    _assert_error(over, 429, None)
    assert over.json()["error"]["type"] == "over_capacity" and int(over.headers["Retry-After"]) >= 1
    assert light.status_code == 200 and results["a"].status_code == 200, results["a"].text
    heavy_s = results["a"].json()["latency_ms"] / 1000
    per_pass = heavy_s / (3 * 40)
    assert light_s <= 4 * per_pass + 0.5, f"light request took {light_s:.2f} s; a pass takes {per_pass:.3f} s"
    assert light_s < heavy_s / 5


def test_with_a_loopback_api_nothing_in_the_server_listens_beyond_loopback(server):
    """The listening sockets of the server's whole process tree (with Ray: its GCS, raylet, workers, proxy and
    replicas) are all on loopback, read with psutil; no traffic is sent anywhere."""
    psutil = pytest.importorskip("psutil")
    root = psutil.Process(server["process"].pid)
    listening = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening |= {(process.name(), c.laddr.ip, c.laddr.port) for c in connections
                      if c.status == psutil.CONN_LISTEN}
    assert any(port == int(server["url"].rsplit(":", 1)[1]) for _, _, port in listening), listening
    exposed = sorted(entry for entry in listening if entry[1] not in ("127.0.0.1", "::1"))
    if server["engine"] == "ray":
        # Ray's gRPC servers (GCS, raylet, workers, replicas) and agents bind to all interfaces whatever the node
        # address: such a server starts only with --ray_ports_beyond_loopback (refused without it, see
        # test_a_loopback_ray_server_needs_the_ports_acknowledged), says so at start-up, and the README tells what
        # to firewall. Only Ray's own processes may listen there, never the API's proxy.
        assert "listen on all interfaces" in server["log"].read_text()
        port = int(server["url"].rsplit(":", 1)[1])
        assert not [entry for entry in exposed if entry[2] == port], exposed
        return
    assert not exposed, f"listening beyond loopback: {exposed}"


def _metrics(server) -> dict:
    text = requests.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}


def _wait_for_log(server, request_id: str, timeout_s: float = 20) -> list:
    """The access-log lines of a request (Ray streams the replica's stderr to the server's output with a delay)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line[line.index("{"):]) for line in server["log"].read_text().splitlines()
                 if f'"request_id": "{request_id}"' in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"no access-log line for {request_id}"
            return lines
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------------------
# Editing and the client


def test_client_generate_and_edits(server, pipe):
    client = Client(server["url"], api_key=KEY)
    assert client.ready()
    images = client.generate(num_images=2, seed=5, timesteps=[11, 0])
    assert [im.size for im in images] == [(28, 28)] * 2 and client.last_response["nfe"] == 2
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]),
                                  _expected(pipe, 2, 5, timesteps=[11, 0]))

    reference = images[0]
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[:, 14:] = 255
    inpainted = client.edit("inpaint", reference, mask=Image.fromarray(mask), seed=2, timesteps=[11, 0])[0]
    expected = pipe.inpaint(reference, Image.fromarray(mask), timesteps=[11, 0],
                            generator=torch.Generator().manual_seed(2)).images[0]
    np.testing.assert_array_equal(np.asarray(inpainted), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(inpainted)[:, :14], np.asarray(reference)[:, :14])  # kept exactly

    low = reference.resize((14, 14))
    assert client.edit("super-resolve", low, scale_factor=2, seed=0)[0].size == (28, 28)
    assert client.last_response["nfe"] >= 1
    assert client.edit("denoise", reference, sigma=0.5, add_noise=True, seed=0)[0].size == (28, 28)
    assert client.last_response["nfe"] == 1
    assert client.edit("stroke", reference, seed=0)[0].size == (28, 28)
    assert client.last_response["nfe"] == 2

    with pytest.raises(APIError) as error:
        Client(server["url"]).generate(seed=0)
    assert error.value.status == 401 and error.value.request_id
    with pytest.raises(APIError) as error:
        client.generate(num_inference_steps=0)
    assert error.value.status == 422 and error.value.field == "num_inference_steps"


def test_graceful_shutdown_drains_with_503_json_then_closes_the_port(server):
    """Last test of the module: SIGTERM while a request runs: /readyz turns 503, new requests get 503 JSON with
    Retry-After (not a 404 or a reset) while the request in flight completes with its 200; then the port closes and
    the server exits 0."""
    result = {}

    def slow_request():
        result["response"] = _post(server, {"num_images": 48, "sigmas": FORTY_SIGMAS[::2], "seed": 1})

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the request is in the server (the /metrics call itself is the other)
        metrics = requests.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if float(re.search(r"^cm_requests_in_flight (\S+)", metrics, re.M).group(1)) >= 2:
            break
        time.sleep(0.05)
    server["process"].send_signal(signal.SIGTERM)
    deadline, readyz = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        readyz = requests.get(server["url"] + "/readyz", timeout=30)
        if readyz.status_code == 503:
            break
        time.sleep(0.05)
    assert readyz.status_code == 503 and readyz.json()["status"] == "draining"
    refused = _post(server, {"seed": 0})
    _assert_error(refused, 503, None)
    assert refused.json()["error"]["type"] == "draining" and int(refused.headers["Retry-After"]) >= 1
    thread.join(120)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["images"]) == 48
    assert server["process"].wait(90) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server["url"] + "/healthz", timeout=5)


# ----------------------------------------------------------------------------------------------------------------
# The deployment class on an RGB class-conditional model (no Ray cluster: @serve.batch runs in any event loop)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    from helpers import make_tiny_unet

    from cm_diffusers import ConsistencyScheduler
    from cm_diffusers.serving.model import ConsistencyModel
    from cm_diffusers.serving.schemas import ServerSettings

    folder = tmp_path_factory.mktemp("rgb")
    ConsistencyPipeline(make_tiny_unet(sample_size=8, in_channels=3, num_class_embeds=5),
                        ConsistencyScheduler()).save_pretrained(folder)
    settings = ServerSettings(model=str(folder), max_batch_size=4, batch_wait_ms=50)
    yield ConsistencyModel(settings.model_dump()), ConsistencyPipeline.from_pretrained(str(folder))


def _request(**kwargs):
    from cm_diffusers.serving.schemas import GenerateRequest

    return GenerateRequest(**kwargs).model_dump()


def test_deployment_batches_class_conditional_multistep_requests_exactly(rgb_model):
    deployment, pipe = rgb_model
    requests_ = [_request(num_images=n, seed=s, timesteps=t, class_labels=c)
                 for n, s, t, c in [(1, 0, [22, 0], None), (3, 1, [22, 0], [1, 2, 3]), (6, 2, [22, 0], 4),
                                    (2, 3, None, None), (1, 4, [30, 10, 0], None)]]

    async def burst():
        return await asyncio.gather(*(deployment.generate(r) for r in requests_))

    results = asyncio.run(burst())
    for request, result in zip(requests_, results):
        expected = pipe(batch_size=request["num_images"], class_labels=request["class_labels"],
                        timesteps=request["timesteps"], generator=torch.Generator().manual_seed(request["seed"]),
                        output_type="np").images
        got = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in result["images"]])
        assert got.shape == (request["num_images"], 8, 8, 3)
        _assert_same_images(got, (expected * 255).round().astype(np.uint8))
    sizes = [batch["images"] for result in results for batch in result["batches"]]
    assert max(sizes) <= 4 and any(b["requests"] > 1 for r in results for b in r["batches"])
    assert deployment.info()["edit_tasks"] == ["inpaint", "colorize", "super-resolve", "stroke", "denoise"]  # RGB
    assert deployment.info()["num_classes"] == 5
    error = asyncio.run(deployment.generate(_request(class_labels=[7])))
    assert error["error"]["field"] == "class_labels"
    error = asyncio.run(deployment.generate({**_request(), "prompt": "a shirt"}))
    assert error["error"]["field"] == "prompt"


def test_without_a_teacher_the_teacher_endpoint_answers_404_saying_how_to_start_one(rgb_model):
    from cm_diffusers.serving.app import create_app
    from cm_diffusers.serving.schemas import ServerSettings

    deployment, _ = rgb_model
    assert "teacher_endpoint" not in deployment.info()
    app = create_app(deployment, ServerSettings())
    status, body = asyncio.run(_asgi_post(app, "/v1/teacher/generate", {"seed": 0, "num_inference_steps": 4}))
    assert status == 404 and body["error"]["type"] == "not_found", body
    assert "--teacher" in body["error"]["message"]


async def _asgi_post(app, path: str, payload: dict) -> tuple:
    """POST JSON to an ASGI app in this process: (status, decoded JSON body)."""
    data, sent = json.dumps(payload).encode(), []

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "server": ("test", 80),
             "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_deployment_colorize_keeps_luma_and_matches_the_pipeline(rgb_model):
    deployment, pipe = rgb_model
    gray = Image.fromarray(np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8))
    options = {"seed": 3, "timesteps": [22, 0], "class_labels": [1], "output_format": "png"}
    result = asyncio.run(deployment.edit("colorize", gray, None, options))
    assert result["nfe"] == 2
    got = np.asarray(Image.open(io.BytesIO(result["images"][0])))
    expected = pipe.colorize(gray, timesteps=[22, 0], class_labels=[1],
                             generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(got, np.asarray(expected))


def test_serve_config_yaml_and_its_builder(monkeypatch):
    """The `serve deploy` config validates against Ray Serve's schema, and its builder refuses to run keyless."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cm_diffusers.serving.deployment import app_builder

    path = os.path.join(os.path.dirname(__file__), "..", "deploy", "serve_config.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema(**config)
    args = config["applications"][0]["args"]
    monkeypatch.delenv("CM_DIFFUSERS_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="No API key"):
        app_builder(args)
    monkeypatch.setenv("CM_DIFFUSERS_API_KEYS", KEY)
    assert type(app_builder(args)).__name__ == "Application"
    with pytest.raises(ValueError, match="shorter than 16"):
        monkeypatch.setenv("CM_DIFFUSERS_API_KEYS", "short")
        app_builder(args)


def test_without_api_keys_the_server_binds_to_loopback_only(tmp_path):
    from cm_diffusers.commands.serve import bind_host
    from cm_diffusers.serving.schemas import load_api_keys

    host, note = bind_host("0.0.0.0", [])
    assert host == "127.0.0.1" and "no API key" in note and "0.0.0.0" in note
    assert bind_host("0.0.0.0", [KEY]) == ("0.0.0.0", None)
    key_file = tmp_path / "keys"
    key_file.write_text(f"# comment\n\n{KEY}\n")
    assert load_api_keys(str(key_file), environ={"CM_DIFFUSERS_API_KEYS": f"{OTHER_KEY}, "}) == [OTHER_KEY, KEY]
    with pytest.raises(FileNotFoundError):
        load_api_keys(str(tmp_path / "missing"), environ={})
    key_file.write_bytes(f"\ufeff{KEY}  # first\n{OTHER_KEY}#second\n".encode("utf-8"))
    assert load_api_keys(str(key_file), environ={}) == [KEY, OTHER_KEY]
    key_file.write_text(f"{KEY} {OTHER_KEY}\n")
    with pytest.raises(ValueError, match="line 1: a key must not contain spaces"):
        load_api_keys(str(key_file), environ={})


def test_a_loopback_ray_server_needs_the_ports_acknowledged():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cm_diffusers.cli", "serve", "--engine", "ray", "--host",
                             "127.0.0.1"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--ray_ports_beyond_loopback" in result.stderr, result.stderr[-2000:]


def test_cluster_flags_need_the_ray_engine():
    import subprocess
    import sys

    for flags in (["--address", "auto"], ["--num_replicas", "2"]):
        result = subprocess.run([sys.executable, "-m", "cm_diffusers.cli", "serve", *flags], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and "--engine ray" in result.stderr, result.stderr[-2000:]
