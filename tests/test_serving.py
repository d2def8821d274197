"""The serving API end to end: a real `cm-diffusers serve` (real Ray, real HTTP on loopback) started once for this
module, in its own process group, on the shipped fashion-mnist-cd with fashion-mnist-ddpm as its teacher; plus the
model deployment class on a tiny RGB class-conditional model, called directly (no Ray cluster) for what the shipped
model cannot show."""

import asyncio
import base64
import io
import json
import os
import re
import signal
import threading
import time
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

KEY, OTHER_KEY = "test-key-aaaaaaaaaaaaaaaa", "test-key-bbbbbbbbbbbbbbbb"
MODEL = "fashion-mnist-cd"
TEACHER = "fashion-mnist-ddpm"
MAX_BATCH = 16
RATE_LIMIT = 150  # per minute and key: the rate-limit test spends OTHER_KEY's allowance, KEY stays far below it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cm-diffusers serve` in its own process group (LocalServer: SIGTERM to the serve process at the end, which
    drains and shuts its Ray instance down, then SIGKILL to whatever of the group is left)."""
    folder = tmp_path_factory.mktemp("serve")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# test keys\n{KEY}\n{OTHER_KEY}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIFFUSERS_API_KEYS="")
    command = ["serve", "--model", MODEL, "--api_key_file", str(key_file), "--max_batch_size", str(MAX_BATCH),
               "--batch_wait_ms", "20", "--rate_limit", str(RATE_LIMIT), "--max_images", "48", "--device", "cpu",
               "--teacher", TEACHER]  # fmt: skip
    with LocalServer(command, log_path=folder / "server.log", env=env) as local:
        yield {"url": local.url, "process": local.process, "log": folder / "server.log"}


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
    assert requests.get(server["url"] + "/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/v1/edit/{task}"}


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
    too_big = requests.post(server["url"] + "/v1/generate", data=b"{" + b" " * 100_000 + b"}",
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _assert_error(too_big, 413, "body")
    not_json = requests.post(server["url"] + "/v1/generate", data=b"{oops",
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert not_json.status_code == 422 and "Traceback" not in not_json.text


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


def test_graceful_shutdown_completes_requests_in_flight(server):
    """Last test of the module: SIGTERM while a request runs; it still gets its 200, and the server exits 0."""
    result = {}

    def slow_request():
        result["response"] = _post(server, {"num_images": 16, "num_inference_steps": 4, "seed": 1})

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the request is in the server (the /metrics call itself is the other)
        metrics = requests.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if float(re.search(r"^cm_requests_in_flight (\S+)", metrics, re.M).group(1)) >= 2:
            break
        time.sleep(0.05)
    server["process"].send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["images"]) == 16
    assert server["process"].wait(90) == 0


# ----------------------------------------------------------------------------------------------------------------
# The deployment class on an RGB class-conditional model (no Ray cluster: @serve.batch runs in any event loop)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    from types import SimpleNamespace

    from helpers import make_tiny_unet
    from ray import serve

    from cm_diffusers import ConsistencyScheduler
    from cm_diffusers.serving.model import ConsistencyModel
    from cm_diffusers.serving.schemas import ServerSettings

    folder = tmp_path_factory.mktemp("rgb")
    ConsistencyPipeline(make_tiny_unet(sample_size=8, in_channels=3, num_class_embeds=5),
                        ConsistencyScheduler()).save_pretrained(folder)
    # Outside a replica, @serve.batch only lacks the replica context it reads to warn about max_ongoing_requests.
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=100))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve, "get_replica_context", lambda: context)
        settings = ServerSettings(model=str(folder), max_batch_size=4, batch_wait_ms=50)
        deployment = ConsistencyModel(settings.model_dump())
        yield deployment, ConsistencyPipeline.from_pretrained(str(folder))


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
    assert max(sizes) <= 4 and sum(sizes) == 13 and any(b["requests"] > 1 for r in results for b in r["batches"])
    assert deployment.info()["edit_tasks"] == ["inpaint", "super-resolve", "denoise", "colorize", "stroke"]
    assert deployment.info()["num_classes"] == 5
    error = asyncio.run(deployment.generate(_request(class_labels=[7])))
    assert error["error"]["field"] == "class_labels"


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
