"""`train_consistency.py --mode lcd` end to end on a tiny Stable-Diffusion-shaped teacher and a captioned image folder
(datasets' imagefolder with metadata.jsonl): both students train, resume exactly, and save what plain diffusers
loads and samples; bad rows are named and skipped."""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler  # noqa: E402
from helpers_sd import IMAGE_SIZE, save_tiny_sd_pipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import train_consistency  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "a green bar", "a white dot"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcd-teacher")
    return save_tiny_sd_pipeline(root / "teacher", root / "tokenizer")


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory):
    """16 RGB images with captions in metadata.jsonl, plus a corrupt image and a row without a caption."""
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        pixels = (rng.uniform(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": CAPTIONS[i % len(CAPTIONS)]})
    (folder / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "a broken file"})
    Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(folder / "uncaptioned.png")
    rows.append({"file_name": "uncaptioned.png", "text": "  "})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def train(*flags):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_consistency.main(train_consistency.parse_args([str(flag) for flag in flags]))


def lcd_flags(teacher_dir, data_dir, output_dir, student, steps=4):
    return ["--mode", "lcd", "--lcd_student", student, "--teacher_model_name_or_path", teacher_dir,
            "--train_data_dir", data_dir, "--output_dir", output_dir, "--max_train_steps", steps,
            "--train_batch_size", 4, "--num_validation_images", 4, "--seed", 0, "--learning_rate", 1e-3,
            "--num_scales", 20, "--checkpointing_steps", 2, "--lora_rank", 4, "--ema_decay", 0.5,
            "--validation_prompts", *CAPTIONS[:2]]  # fmt: skip


def steps_of(output_dir, log="train_log.jsonl"):
    with open(Path(output_dir) / "logs" / log) as f:
        return [entry for entry in map(json.loads, f) if "step" in entry]


def assert_resume_is_exact(teacher_dir, data_dir, tmp_path, student, weights):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*lcd_flags(teacher_dir, data_dir, straight, student))
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert train(*lcd_flags(teacher_dir, data_dir, resumed, student), "--resume_from_checkpoint", "latest") == 4
    a, b = steps_of(straight)[2:], steps_of(resumed)
    assert [entry["step"] for entry in b] == [3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["guidance_mean"] == y["guidance_mean"]
    first, second = load_file(straight / weights), load_file(resumed / weights)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6)
    return straight


def test_lcd_lcm_trains_resumes_exactly_and_saves_an_lcm_pipeline(teacher_dir, captioned_images, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = assert_resume_is_exact(teacher_dir, captioned_images, tmp_path, "lcm",
                                     "unet/diffusion_pytorch_model.safetensors")  # fmt: skip
    assert "broken.png" in caplog.text and "uncaptioned.png (empty caption)" in caplog.text  # named and skipped
    log = steps_of(out)
    assert all(np.isfinite(entry["loss"]) and 3.0 <= entry["guidance_mean"] <= 15.0 for entry in log)
    assert {entry["num_scales"] for entry in log} == {20} and {entry["target_ema"] for entry in log} == {0.95}

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, LatentConsistencyModelPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 20 and pipe.unet.config.time_cond_proj_dim == 256
    images = pipe(CAPTIONS[:2], num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "latent-consistency-distillation" in card and "LatentConsistencyModelPipeline" in card
    assert "| w_min | 3.0 |" in card and "teacher (a local folder)" in card
    assert {"samples_1step.png", "samples_2step.png", "samples_4step.png"} <= {p.name for p in out.iterdir()}


def test_lcd_lora_trains_resumes_exactly_and_saves_lora_weights(teacher_dir, captioned_images, tmp_path):
    out = assert_resume_is_exact(teacher_dir, captioned_images, tmp_path, "lora", "pytorch_lora_weights.safetensors")
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in name for name in weights)
    assert {entry["target_ema"] for entry in steps_of(out)} == {0.0}  # LCM-LoRA: no target network

    pipe = DiffusionPipeline.from_pretrained(teacher_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    before = pipe(CAPTIONS[:1], num_inference_steps=2, guidance_scale=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    pipe.load_lora_weights(out)
    after = pipe(CAPTIONS[:1], num_inference_steps=2, guidance_scale=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert np.isfinite(after).all() and not np.allclose(before, after)  # the adapters change the sampler's output
    assert "pipe.load_lora_weights" in (out / "README.md").read_text()


def test_lcd_refuses_pixel_only_flags_and_bad_guidance_ranges(teacher_dir, captioned_images, tmp_path):
    flags = lcd_flags(teacher_dir, captioned_images, tmp_path, "lcm")
    assert train_consistency.parse_args([str(f) for f in flags]).ema_decay == 0.5  # given: kept
    without_ema = [str(f) for f in flags[: flags.index("--ema_decay")] + flags[flags.index("--ema_decay") + 2 :]]
    assert train_consistency.parse_args(without_ema).ema_decay == 0.0  # LCD saves the online weights by default
    for extra in (["--denoiser_warmup_steps", 1], ["--class_conditional"], ["--w_min", 9, "--w_max", 3]):
        with pytest.raises(SystemExit):
            train_consistency.parse_args([str(flag) for flag in [*flags, *extra]])


def test_generate_prompt_samples_lcm_folders_and_teacher_plus_lora(teacher_dir, captioned_images, tmp_path, capsys):
    from cm_diffusers.cli import main

    for student in ("lcm", "lora"):
        train(*lcd_flags(teacher_dir, captioned_images, tmp_path / student, student, steps=1))
    common = ["generate", "--num_images", 3, "--nrow", 3, "--steps", 2, "--seed", 1, "--prompt", CAPTIONS[0]]
    runs = {
        "lcm": ["--model", tmp_path / "lcm"],
        "lora": ["--model", teacher_dir, "--lora", tmp_path / "lora", "--guidance_scale", 1.5],
    }
    for name, flags in runs.items():
        for copy in ("a", "b"):
            assert main([str(f) for f in [*common, *flags, "--output", tmp_path / f"{name}_{copy}.png"]]) == 0
        a, b = (np.asarray(Image.open(tmp_path / f"{name}_{copy}.png")) for copy in ("a", "b"))
        assert a.shape == (IMAGE_SIZE + 4, 3 * (IMAGE_SIZE + 2) + 2, 3) and np.array_equal(a, b)  # one row; seeded
    assert main(["generate", "--model", str(teacher_dir), "--prompt", "x", "--output", str(tmp_path / "t.png")]) == 1
    assert "not LCMScheduler" in capsys.readouterr().err
    empty = ["generate", "--model", str(tmp_path / "lcm"), "--prompt", "", "--output", str(tmp_path / "e.png")]
    assert main(empty) == 1
    assert "1 to 1000 characters" in capsys.readouterr().err


def test_captioned_data_names_bad_rows_or_stops_and_class_prompts_need_names(captioned_images, labelled_folder):
    import argparse

    from training.data import add_data_args, build_dataset

    def args_for(*flags):
        return add_data_args(argparse.ArgumentParser()).parse_args([str(f) for f in flags])

    dataset = build_dataset(args_for("--train_data_dir", captioned_images, "--caption_column", "text"))
    assert len(dataset) == 16 and dataset[0]["captions"] == CAPTIONS[0]
    with pytest.raises(ValueError, match=r"uncaptioned\.png \(empty caption\)"):
        build_dataset(args_for("--train_data_dir", captioned_images, "--caption_column", "text",
                               "--on_bad_image", "error"))  # fmt: skip
    with pytest.raises(ValueError, match="--caption_column 'caption' is not a column"):
        build_dataset(args_for("--train_data_dir", captioned_images, "--caption_column", "caption"))
    dataset = build_dataset(args_for("--train_data_dir", labelled_folder, "--caption_template", "a photo of a {}"))
    assert sorted({dataset[i]["captions"] for i in range(len(dataset))}) == ["a photo of a boot", "a photo of a shirt"]
    with pytest.raises(ValueError, match="needs a '{}'"):
        build_dataset(args_for("--train_data_dir", labelled_folder, "--caption_template", "a photo"))


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    for label in ("Boot", "Shirt"):
        (folder / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    return folder


def test_cached_latents_draw_what_encoding_draws_without_the_encoder(teacher_dir):
    from cm_diffusers.latent import LatentUNet, build_lcm_student, load_latent_teacher
    from cm_diffusers.losses import build_loss, l2
    from cm_diffusers.training.latent import LatentDistillationLoss

    teacher = load_latent_teacher(teacher_dir)
    student = LatentUNet(build_lcm_student(teacher.unet, 32))
    consistency = build_loss("lcd", l2, teacher=teacher, num_train_timesteps=1000, num_ddim_timesteps=20,
                             timestep_scaling=10.0)  # fmt: skip
    pixels = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoded = LatentDistillationLoss(consistency, teacher, 2.0, 8.0)
    cached = LatentDistillationLoss(consistency, teacher, 2.0, 8.0, cache_latents=True)
    calls = []
    encode = teacher.vae.encode
    teacher.vae.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)  # counts, then runs the real encoder
    values = []
    for loss in (encoded, cached, cached):
        torch.manual_seed(3)
        with torch.no_grad():
            values.append(loss(student, student, pixels, None, captions=CAPTIONS)[0].item())
    assert len(calls) == 1 + 4  # encoded: one batch; cached: each image once, then never again
    assert values[1] == values[2] and values[0] == pytest.approx(values[1], rel=1e-5)


@pytest.mark.slow
def test_two_processes_keep_the_lora_adapters_in_sync(teacher_dir, captioned_images, tmp_path):
    """Two gloo ranks of LCM-LoRA: only the adapters train, their gradients are averaged, and both ranks hold
    identical weights after every step while each sees its own data shard."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO / "training" / "train_consistency.py")]  # fmt: skip
    flags = lcd_flags(teacher_dir, captioned_images, out, "lora", steps=3) + ["--log_every_rank"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command + [str(flag) for flag in flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [steps_of(out, f"train_log_rank{rank}.jsonl") for rank in (0, 1)]
    assert [e["weights_sha256"] for e in logs[0]] == [e["weights_sha256"] for e in logs[1]]
    assert len({e["weights_sha256"] for e in logs[0]}) == 3  # the adapters change every step
    assert any(a["local_loss"] != b["local_loss"] for a, b in zip(*logs))  # different data shards
    assert (out / "pytorch_lora_weights.safetensors").is_file()
