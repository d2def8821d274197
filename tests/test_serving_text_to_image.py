"""Serving a latent text-to-image model: `cm-diffusers serve` (the embedded engine, real HTTP on loopback) on a tiny
LCM folder and on a tiny teacher with LCM-LoRA weights, built from configs without downloads. A prompt request gives
the images `latent.text_to_image.generate` gives on the same pipeline, prompts and seed; a bad prompt is a 422 naming
`prompt`; the routes that need a pixel consistency model say so; and the API conforms to its own OpenAPI schema."""

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
requests = pytest.importorskip("requests")

from helpers_sd import IMAGE_SIZE, save_tiny_sd_pipeline  # noqa: E402

from cm_diffusers.latent import (  # noqa: E402
    add_lcm_lora,
    build_lcm_student,
    load_latent_teacher,
    lora_config,
    save_lcm_lora,
    save_lcm_pipeline,
)
from cm_diffusers.latent.text_to_image import MAX_PROMPT_CHARACTERS, generate, load_text_to_image  # noqa: E402
from cm_diffusers.serving import APIError, Client  # noqa: E402
from cm_diffusers.serving.local import LocalServer  # noqa: E402

KEY = "t2i-key-" + "t" * 20
PROMPTS = ["a red square", "a blue circle", "a green bar"]
MAX_IMAGES, MAX_STEPS, MAX_BATCH = 4, 4, 2  # small limits keep the fuzzer's requests fast; batch 2 splits requests


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny teacher, its LCM (a random w-projection, so the guidance scale matters) and an LCM-LoRA (random
    adapters, so that they matter)."""
    root = tmp_path_factory.mktemp("t2i")
    teacher_dir = save_tiny_sd_pipeline(root / "teacher", root / "tokenizer")
    teacher = load_latent_teacher(teacher_dir)
    torch.manual_seed(0)
    student = build_lcm_student(teacher.unet, time_cond_proj_dim=32)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(std=0.5)
    save_lcm_pipeline(root / "lcm", student.eval(), teacher)
    config = lora_config(rank=4)
    unet = add_lcm_lora(teacher.unet, config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    save_lcm_lora(root / "lora", unet.eval(), config)
    return {"teacher": teacher_dir, "lcm": str(root / "lcm"), "lora": str(root / "lora"), "root": root}


def _serve(folders, name: str, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIFFUSERS_API_KEYS=KEY)
    command = ["serve", *flags, "--device", "cpu", "--max_images", str(MAX_IMAGES), "--max_steps", str(MAX_STEPS),
               "--max_batch_size", str(MAX_BATCH), "--rate_limit", "0", "--auth_failures_per_minute", "0",
               "--drain_s", "0"]  # fmt: skip
    return LocalServer(command, log_path=folders["root"] / f"{name}.log", env=env)


@pytest.fixture(scope="module")
def lcm_server(folders):
    with _serve(folders, "lcm", "--model", folders["lcm"]) as server:
        yield server


@pytest.fixture(scope="module")
def lora_server(folders):
    with _serve(folders, "lora", "--model", folders["teacher"], "--lora", folders["lora"]) as server:
        yield server


def _post(server, payload: dict, path: str = "/v1/generate"):
    return requests.post(server.url + path, json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _images(body: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) for b64 in body["images"]])


def _expected(pipe, prompts, steps, guidance_scale, seed) -> np.ndarray:
    """`generate` as the server runs it (one torch thread, parts of MAX_BATCH images), as 8-bit images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = generate(pipe, prompts, steps, guidance_scale, seed, batch_size=MAX_BATCH)
    finally:
        torch.set_num_threads(threads)
    return (images * 255).round().astype(np.uint8)


def _assert_error(response, status: int, field: str | None, *words: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in response.text and ".py" not in response.text


@pytest.mark.parametrize("kind", ["lcm", "lora"])
def test_prompt_requests_give_the_images_of_generate(kind, folders, request):
    """A served LCM folder and a served teacher + LCM-LoRA: seeded prompt requests (one prompt, one per image, a
    non-default guidance scale, a request split into parts) equal `generate` on the same pipeline; the same seed
    gives the same images, and /v1/models says the model takes prompts."""
    server = request.getfixturevalue(f"{kind}_server")
    pipe = load_text_to_image(folders["teacher"], folders["lora"]) if kind == "lora" \
        else load_text_to_image(folders["lcm"])
    cases = [({"prompt": PROMPTS[0], "num_images": 2, "seed": 5}, [PROMPTS[0]] * 2, 4, None),
             ({"prompt": PROMPTS, "num_images": 3, "num_inference_steps": 2, "guidance_scale": 2.5, "seed": 9},
              PROMPTS, 2, 2.5)]  # fmt: skip
    for payload, prompts, steps, guidance in cases:
        response = _post(server, payload)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["seed"] == payload["seed"] and body["latency_ms"] > 0
        cfg = kind == "lora" and (guidance or 1.0) > 1  # the teacher's pipeline doubles the batch for guidance
        assert body["nfe"] == steps * (2 if cfg else 1)
        got = _images(body)
        assert got.shape == (len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(got, _expected(pipe, prompts, steps, guidance, payload["seed"]))
    again = _images(_post(server, cases[0][0]).json())
    np.testing.assert_array_equal(again, _expected(pipe, cases[0][1], 4, None, 5))
    other_guidance = _images(_post(server, {**cases[0][0], "guidance_scale": 7.0}).json())
    assert not np.array_equal(other_guidance, again)  # the guidance scale reaches the model

    info = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    model = info["models"][0]
    assert model["takes_prompt"] is True and model["max_prompt_characters"] == MAX_PROMPT_CHARACTERS
    assert model["resolution"] == [IMAGE_SIZE, IMAGE_SIZE] and model["channels"] == 3 and model["edit_tasks"] == []
    assert model["guidance_scale"] == (8.5 if kind == "lcm" else 1.0)


def test_bad_prompts_are_422_naming_prompt(lcm_server):
    too_long = "x" * (MAX_PROMPT_CHARACTERS + 1)
    for payload in ({}, {"prompt": ""}, {"prompt": "   "}, {"prompt": too_long}, {"prompt": 3}, {"prompt": [1]},
                    {"prompt": None}, {"prompt": []}, {"prompt": ["a", too_long]},
                    {"prompt": PROMPTS, "num_images": 2},
                    {"prompt": ["a"] * (MAX_IMAGES + 1), "num_images": MAX_IMAGES}):
        _assert_error(_post(lcm_server, payload), 422, "prompt")
    _assert_error(_post(lcm_server, {"prompt": PROMPTS[:2], "num_images": 3}), 422, "prompt", "1 prompt or 3")
    for field, value in (("guidance_scale", 21), ("guidance_scale", -1), ("guidance_scale", "NaN"),
                         ("num_inference_steps", MAX_STEPS + 1), ("num_images", MAX_IMAGES + 1),
                         ("timesteps", [11, 0]), ("class_labels", 1), ("sigmas", [80.0])):
        _assert_error(_post(lcm_server, {"prompt": "a", field: value}), 422, field)


def test_routes_that_need_a_pixel_model_say_so(lcm_server):
    response = requests.post(lcm_server.url + "/v1/edit/inpaint", headers={"Authorization": f"Bearer {KEY}"},
                             files={"image": ("a.png", b"x", "image/png")}, timeout=30)
    _assert_error(response, 404, "task", "Editing needs a pixel consistency model")
    _assert_error(_post(lcm_server, {"num_inference_steps": 2}, "/v1/teacher/generate"), 404, None,
                  "text-to-image model")
    paths = requests.get(lcm_server.url + "/openapi.json", timeout=30).json()["paths"]
    assert not [path for path in paths if path.startswith(("/v1/edit", "/v1/teacher"))]


def test_client_generate_takes_a_prompt(lcm_server, folders):
    client = Client(lcm_server.url, api_key=KEY)
    images = client.generate(num_images=2, prompt=PROMPTS[1], num_inference_steps=2, seed=4)
    got = np.stack([np.asarray(image) for image in images])
    np.testing.assert_array_equal(got, _expected(load_text_to_image(folders["lcm"]), [PROMPTS[1]] * 2, 2, None, 4))
    assert client.last_response["nfe"] == 2
    with pytest.raises(APIError) as error:
        client.generate(num_images=2, prompt=["one"] * 3)
    assert error.value.status == 422 and error.value.field == "prompt"


def test_a_cancelled_prompt_request_runs_no_further_network_evaluation(folders):
    """The deployment class in this process: a request cancelled mid-way (its time limit) stops before its next
    network evaluation, and one cancelled while waiting for the model thread never starts."""
    import asyncio

    from cm_diffusers.serving.schemas import Limits, ServerSettings
    from cm_diffusers.serving.text_to_image import TextToImageModel

    settings = ServerSettings(model=folders["lcm"], text_to_image=True, max_batch_size=64,
                              limits=Limits(max_images=64, max_steps=40))
    model = TextToImageModel(settings.model_dump())
    heavy = {"prompt": "a", "num_images": 64, "num_inference_steps": 40, "seed": 0}  # 40 passes of 64 rows

    async def cancel_both():
        running = asyncio.ensure_future(model.generate(heavy))
        waiting = asyncio.ensure_future(model.generate({**heavy, "num_inference_steps": 1}))
        while not model.stats()["forward_passes"]:
            await asyncio.sleep(0.01)
        running.cancel()
        waiting.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        await asyncio.sleep(0.5)  # the model thread ends the heavy request at its next evaluation

    asyncio.run(cancel_both())
    stats = model.stats()
    assert stats["cancelled_requests"] == 2 and stats["forward_passes"] < 40
    assert stats["network_evaluations"] == 64 * stats["forward_passes"]  # the waiting request never started
    after = asyncio.run(model.generate({"prompt": "a", "num_images": 1, "num_inference_steps": 2, "seed": 1}))
    assert after["nfe"] == 2 and model.stats()["forward_passes"] == stats["forward_passes"] + 2


def test_serve_refuses_what_does_not_fit_a_text_to_image_model(folders, capsys):
    """LCM-LoRA weights on a pixel model, a teacher route for a text-to-image model, a teacher folder without its
    LCM-LoRA (no LCMScheduler): `serve` stops with a message that says what to pass."""
    from cm_diffusers.cli import main

    for flags, words in ((["--model", "fashion-mnist-cd", "--lora", folders["lora"]], "--lora"),
                         (["--model", folders["lcm"], "--teacher", "fashion-mnist-ddpm"], "--teacher"),
                         (["--model", folders["teacher"]], "not LCMScheduler")):
        assert main(["serve", *flags, "--port", "1"]) == 1
        assert words in capsys.readouterr().err


def test_the_text_to_image_api_conforms_to_its_openapi_schema(lcm_server, capsys):
    from test_serving_schema import fuzz_every_operation

    fuzz_every_operation(lcm_server.url, KEY, capsys, minimum_operations=5)
