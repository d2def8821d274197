"""Latent consistency distillation on tiny real Stable-Diffusion-shaped components: a few steps of LCM (w-embedding)
and LCM-LoRA (peft) on the project's consistency loss, saved, loaded by plain diffusers, sampled, and equal to the
package's own few-step sampler on the same seed."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)
from helpers_sd import IMAGE_SIZE, save_tiny_sd_pipeline  # noqa: E402

from cm_diffusers.latent import (  # noqa: E402
    AdaptersDisabled,
    LatentUNet,
    add_lcm_lora,
    build_lcm_student,
    decode_latents,
    encode_images,
    encode_prompt,
    lcd_loss,
    lcm_sample_latents,
    load_latent_teacher,
    lora_config,
    save_lcm_lora,
    save_lcm_pipeline,
)
from cm_diffusers.losses import ConsistencyLoss, build_loss, l2  # noqa: E402

PROMPTS = ["a shirt", "a boot", "a bag", "a dress"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcd")
    return save_tiny_sd_pipeline(root / "teacher", root / "tokenizer")


def build_lcd_loss(teacher):
    """The loss `--mode lcd` trains with, from its record in the mode table (as train_consistency.py builds it)."""
    return build_loss("lcd", l2, teacher=teacher, num_train_timesteps=1000, num_ddim_timesteps=50,
                      timestep_scaling=10.0)  # fmt: skip


def _batch(teacher, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    latents = encode_images(teacher.vae, pixels, generator)
    prompt_embeds = encode_prompt(teacher.tokenizer, teacher.text_encoder, PROMPTS)
    uncond_embeds = encode_prompt(teacher.tokenizer, teacher.text_encoder, [""])
    return latents, prompt_embeds, uncond_embeds


def _train(loss, student_unet, student, target, teacher, steps=3):
    latents, prompt_embeds, uncond_embeds = _batch(teacher)
    optimizer = torch.optim.AdamW([p for p in student_unet.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    values = []
    for _ in range(steps):
        value, logs = lcd_loss(loss, student, target, latents, prompt_embeds, uncond_embeds, w_min=2.0, w_max=8.0)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
        assert torch.isfinite(value) and 2.0 <= float(logs["guidance_mean"]) <= 8.0
    return values


def test_prompt_encoding_and_teacher_loading_match_stable_diffusion_pipeline(teacher_dir):
    teacher = load_latent_teacher(teacher_dir)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir)
    ours = encode_prompt(teacher.tokenizer, teacher.text_encoder, PROMPTS)
    theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert teacher.prediction_type == "epsilon" and teacher.num_train_timesteps == 1000
    torch.testing.assert_close(teacher.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod, rtol=0, atol=0)


def test_teacher_without_text_parts_is_refused_with_what_is_missing(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    from helpers import make_tiny_unet

    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="Stable-Diffusion-shaped teacher.*vae.*text_encoder"):
        load_latent_teacher(str(tmp_path / "ddpm"))


def test_lcm_distills_saves_a_pipeline_plain_diffusers_loads_and_matches_our_sampler(teacher_dir, tmp_path):
    teacher = load_latent_teacher(teacher_dir)
    student_unet = build_lcm_student(teacher.unet, time_cond_proj_dim=32)
    target_unet = copy.deepcopy(student_unet).requires_grad_(False)  # LCM's EMA target network

    # The zero-initialised w-projection makes the untrained student the teacher's conditional prediction
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 499]), torch.randn(2, 16, 16)
    with torch.no_grad():
        student_output = LatentUNet(student_unet)(x, t, cond, guidance=torch.tensor([3.0, 9.0]))
        torch.testing.assert_close(student_output, LatentUNet(teacher.unet)(x, t, cond))

    loss = build_lcd_loss(teacher)
    assert isinstance(loss, ConsistencyLoss)  # the project's one loss object
    before = copy.deepcopy(student_unet.state_dict())
    _train(loss, student_unet, LatentUNet(student_unet), LatentUNet(target_unet), teacher)
    changed = [name for name, value in student_unet.state_dict().items() if not torch.equal(value, before[name])]
    assert "time_embedding.cond_proj.weight" in changed and len(changed) > 10

    save_lcm_pipeline(tmp_path / "lcm", student_unet.eval(), teacher, original_inference_steps=50,
                      card="# tiny LCM\n")  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "lcm")
    assert isinstance(pipe, LatentConsistencyModelPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert (tmp_path / "lcm" / "README.md").read_text() == "# tiny LCM\n"

    for steps, guidance_scale in ((1, 8.0), (4, 8.0), (2, 3.0)):
        generator = torch.Generator().manual_seed(7)
        theirs = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance_scale, height=IMAGE_SIZE,
                      width=IMAGE_SIZE, generator=generator, output_type="latent").images  # fmt: skip
        prompt_embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, PROMPTS[:2])
        ours = lcm_sample_latents(pipe.unet, prompt_embeds, teacher.alphas_cumprod, steps, guidance_scale,
                                  latent_shape=theirs.shape, generator=torch.Generator().manual_seed(7))  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
                  output_type="pt", generator=torch.Generator().manual_seed(7)).images  # fmt: skip
    torch.testing.assert_close(decode_latents(pipe.vae, ours), images, rtol=1e-5, atol=1e-5)  # the last schedule's
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_lcm_lora_trains_adapters_only_and_loads_with_load_lora_weights(teacher_dir, tmp_path):
    teacher = load_latent_teacher(teacher_dir)
    original = copy.deepcopy(teacher.unet)
    config = lora_config(rank=4, alpha=2)  # alpha != rank: the saved metadata must restore the scale alpha / r
    unet = add_lcm_lora(teacher.unet, config)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    # The teacher is the same UNet with its adapters off: exactly the original network
    network = AdaptersDisabled(unet)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 19]), torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(network(x, t, cond), LatentUNet(original)(x, t, cond), rtol=0, atol=0)

    teacher.network = network
    loss = build_lcd_loss(teacher)
    student = LatentUNet(unet)  # LCM-LoRA has no target network: the target is the stop-gradient student
    _train(loss, unet, student, student, teacher)
    assert any(p.abs().sum() > 0 for name, p in unet.named_parameters() if "lora_B" in name)

    save_lcm_lora(tmp_path / "lora", unet.eval(), config)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")

    for steps, guidance_scale in ((4, 1.0), (2, 1.5)):
        generator = torch.Generator().manual_seed(3)
        theirs = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance_scale, height=IMAGE_SIZE,
                      width=IMAGE_SIZE, generator=generator, output_type="latent").images  # fmt: skip
        prompt_embeds = encode_prompt(teacher.tokenizer, teacher.text_encoder, PROMPTS[:2])
        negative = encode_prompt(teacher.tokenizer, teacher.text_encoder, ["", ""])
        ours = lcm_sample_latents(unet, prompt_embeds, teacher.alphas_cumprod, steps, guidance_scale,
                                  latent_shape=theirs.shape, generator=torch.Generator().manual_seed(3),
                                  negative_prompt_embeds=negative)  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
