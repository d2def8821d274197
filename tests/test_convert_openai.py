"""OpenAI checkpoint conversion: key mapping, round trips, OpenAI's own forward pass, released layouts, errors.

`openai_shapes` and `openai_forward` re-state OpenAI's `cm/unet.py` UNetModel (constructor and forward, flash-
attention qkv layout) independently of the converter, so a wrong mapping cannot pass by being its own inverse.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from cm_diffusers import ConsistencyPipeline
from cm_diffusers.cli import main as cli_main
from cm_diffusers.convert_openai import (
    UNET_CONFIGS,
    convert_openai_checkpoint,
    convert_state_dict,
    infer_unet_config,
    load_openai_checkpoint,
    resolve_unet_config,
    to_openai_state_dict,
)

# Scaled-down versions of OpenAI's two released layouts (OpenAI flags in the comments), 2 heads per attention.
TINY_IMAGENET = dict(  # --num_channels 32 --channel_mult 1,2 --num_res_blocks 2 --attention_resolutions at ds 2
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=2, num_class_embeds=10,
    block_out_channels=(32, 64), attention_head_dim=32,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, upsample_type="resnet", downsample_type="resnet",
)  # fmt: skip
TINY_LSUN = dict(  # --num_channels 32 --channel_mult 1,1,2 --num_res_blocks 1, attention at ds 4, no classes
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, num_class_embeds=None,
    block_out_channels=(32, 32, 64), attention_head_dim=32,
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="default", attn_norm_num_groups=32, upsample_type="resnet", downsample_type="resnet",
)  # fmt: skip


def as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def random_unet(config, seed=0) -> UNet2DModel:
    """A UNet2DModel whose every tensor (norms and zero-initialised convs included) is random."""
    torch.manual_seed(seed)
    unet = UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        for param in unet.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return unet


# ----------------------------------------------------------------------------------------------------------------
# OpenAI's UNetModel, re-stated from github.com/openai/consistency_models cm/unet.py


def openai_shapes(model_channels, channel_mult, num_res_blocks, attention_ds, num_classes, scale_shift, channels=3):
    """{key: shape} of OpenAI's UNetModel(..., resblock_updown=True).state_dict()."""
    emb = 4 * model_channels
    shapes = {"time_embed.0.weight": (emb, model_channels), "time_embed.0.bias": (emb,),
              "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}  # fmt: skip
    if num_classes:
        shapes["label_emb.weight"] = (num_classes, emb)

    def conv(prefix, cout, cin, k):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (cout, cin, k, k), (cout,)

    def norm(prefix, c):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (c,), (c,)

    def resblock(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        shapes[f"{p}.emb_layers.1.weight"] = (2 * cout if scale_shift else cout, emb)
        shapes[f"{p}.emb_layers.1.bias"] = (2 * cout if scale_shift else cout,)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def attention(p, c):
        norm(f"{p}.norm", c)
        conv(f"{p}.qkv", 3 * c, c, 1)
        conv(f"{p}.proj_out", c, c, 1)

    ch = model_channels * channel_mult[0]
    conv("input_blocks.0.0", ch, channels, 3)
    chans, ds, index = [ch], 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{index}.0", ch, model_channels * mult)
            ch = model_channels * mult
            if ds in attention_ds:
                attention(f"input_blocks.{index}.1", ch)
            chans.append(ch)
            index += 1
        if level != len(channel_mult) - 1:
            resblock(f"input_blocks.{index}.0", ch, ch)
            chans.append(ch)
            ds, index = ds * 2, index + 1
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    index = 0
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{index}.0", ch + chans.pop(), model_channels * mult)
            ch, sub = model_channels * mult, 1
            if ds in attention_ds:
                attention(f"output_blocks.{index}.1", ch)
                sub = 2
            if level and i == num_res_blocks:
                resblock(f"output_blocks.{index}.{sub}", ch, ch)
                ds //= 2
            index += 1
    norm("out.0", ch)
    conv("out.2", channels, model_channels * channel_mult[0], 3)
    return shapes


def openai_forward(sd, x, timesteps, labels=None, *, num_res_blocks, scale_shift, head_channels=32):
    """OpenAI's UNetModel.forward on a state dict (resblock_updown=True, flash-attention qkv layout)."""

    def conv(h, p):
        return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=sd[f"{p}.weight"].shape[-1] // 2)

    def norm(h, p):
        return F.group_norm(h.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def resblock(h, emb, p, up=False, down=False):
        out = F.silu(norm(h, f"{p}.in_layers.0"))
        if up:
            out, h = F.interpolate(out, scale_factor=2.0), F.interpolate(h, scale_factor=2.0)  # nearest
        if down:
            out, h = F.avg_pool2d(out, 2), F.avg_pool2d(h, 2)
        out = conv(out, f"{p}.in_layers.2")
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
        if scale_shift:
            scale, shift = e.chunk(2, dim=1)
            out = norm(out, f"{p}.out_layers.0") * (1 + scale) + shift
        else:
            out = norm(out + e, f"{p}.out_layers.0")
        out = conv(F.silu(out), f"{p}.out_layers.3")
        skip = conv(h, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in sd else h
        return skip + out

    def attention(h, p):
        b, c, height, width = h.shape
        heads = c // head_channels
        qkv = conv(norm(h, f"{p}.norm"), f"{p}.qkv").reshape(b, 3, heads, head_channels, height * width)
        q, k, v = qkv.unbind(1)  # "b (three h d) s": q, k, v blocks, each split into heads
        weight = torch.softmax(torch.einsum("bhds,bhdt->bhst", q, k) / math.sqrt(head_channels), dim=-1)
        out = torch.einsum("bhst,bhdt->bhds", weight, v).reshape(b, c, height, width)
        return h + conv(out, f"{p}.proj_out")

    half = sd["time_embed.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])  # fmt: skip
    if labels is not None:
        emb = emb + sd["label_emb.weight"][labels]

    num_inputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    num_outputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))
    h = conv(x, "input_blocks.0.0")
    hs = [h]
    for i in range(1, num_inputs):
        p = f"input_blocks.{i}"
        is_down = i % (num_res_blocks + 1) == 0  # each level: num_res_blocks ResBlocks, then a downsampling one
        h = resblock(h, emb, f"{p}.0", down=is_down)
        if f"{p}.1.qkv.weight" in sd:
            h = attention(h, f"{p}.1")
        hs.append(h)
    h = resblock(h, emb, "middle_block.0")
    h = attention(h, "middle_block.1")
    h = resblock(h, emb, "middle_block.2")
    for i in range(num_outputs):
        p = f"output_blocks.{i}"
        h = resblock(torch.cat([h, hs.pop()], dim=1), emb, f"{p}.0")
        sub = 1
        if f"{p}.1.qkv.weight" in sd:
            h, sub = attention(h, f"{p}.1"), 2
        if f"{p}.{sub}.in_layers.0.weight" in sd:
            h = resblock(h, emb, f"{p}.{sub}", up=True)
    return conv(F.silu(norm(h, "out.0")), "out.2")


# ----------------------------------------------------------------------------------------------------------------
# Round trips through .pt files


def save_openai_checkpoint(unet, path):
    torch.save(to_openai_state_dict(unet), path)
    return path


@pytest.mark.parametrize(
    "config, name, hparams, num_train_timesteps",
    [
        (TINY_IMAGENET, "cd_tiny64_l2.pt", dict(num_res_blocks=2, scale_shift=True), 40),
        (TINY_LSUN, "ct_tinybedroom.pt", dict(num_res_blocks=1, scale_shift=False), 151),
    ],
    ids=["imagenet-like", "lsun-like"],
)
def test_round_trip_every_tensor_and_output_and_openai_forward(tmp_path, config, name, hparams, num_train_timesteps):
    unet = random_unet(config)
    openai_sd = to_openai_state_dict(unet)
    torch.save(openai_sd, tmp_path / name)

    # The inverse mapping produces exactly the tensors OpenAI's UNetModel constructor declares.
    num_levels = len(config["block_out_channels"])
    attention_ds = [2**level for level, t in enumerate(config["down_block_types"]) if "Attn" in t]
    expected = openai_shapes(32, [c // 32 for c in config["block_out_channels"]], hparams["num_res_blocks"],
                             attention_ds, config["num_class_embeds"], hparams["scale_shift"])  # fmt: skip
    assert {k: tuple(v.shape) for k, v in openai_sd.items()} == expected and num_levels > 1

    args = ["convert-openai", "--checkpoint", str(tmp_path / name), "--output", str(tmp_path / "out"),
            "--sample_size", "16", "--attention_head_dim", "32", "--num_train_timesteps", str(num_train_timesteps)]
    assert cli_main(args) == 0  # fmt: skip
    pipe = ConsistencyPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.num_train_timesteps == num_train_timesteps
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "ConsistencyModelPipeline"
    converted = pipe.unet.state_dict()
    assert converted.keys() == unet.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in unet.state_dict().items())
    assert {k: as_list(pipe.unet.config[k]) for k in config} == {k: as_list(v) for k, v in config.items()}

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([250 * math.log(80.0), 250 * math.log(0.5)])
    labels = torch.tensor([3, 7]) if config["num_class_embeds"] else None
    with torch.no_grad():
        ours = pipe.unet(x, t, class_labels=labels).sample
        assert torch.equal(ours, unet(x, t, class_labels=labels).sample)
        reference = openai_forward(openai_sd, x, t, labels, **hparams)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)

    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: mit" in card and name in card


def test_edm_teacher_becomes_a_teacher_folder_with_openai_denoiser(tmp_path):
    """OpenAI's KarrasDenoiser (training_mode edm): D = c_skip x + c_out F(c_in x, 250 ln sigma), EDM scalings."""
    from cm_diffusers import load_teacher

    unet = random_unet(TINY_IMAGENET, seed=3)
    openai_sd = to_openai_state_dict(unet)
    torch.save(openai_sd, tmp_path / "edm_tiny64_ema.pt")
    out = convert_openai_checkpoint(tmp_path / "edm_tiny64_ema.pt", tmp_path / "teacher", sample_size=16,
                                    attention_head_dim=32)  # fmt: skip
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "unet"]
    teacher = load_teacher(out)
    assert teacher.kind == "edm" and (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 3
    sigma, labels, sigma_data = torch.tensor([2.5, 0.3]), torch.tensor([1, 9]), 0.5
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    with torch.no_grad():
        F_x = openai_forward(openai_sd, c_in[:, None, None, None] * x, 250 * torch.log(sigma), labels,
                             num_res_blocks=2, scale_shift=True)  # fmt: skip
        expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * F_x
        torch.testing.assert_close(teacher(x, sigma, class_labels=labels), expected, rtol=1e-4, atol=1e-4)


def test_released_layouts_match_openai_unet_and_are_recognised():
    """The full-size ImageNet-64 and LSUN-256 configs, checked on meta tensors (no memory, no compute)."""
    released = {
        "imagenet64": openai_shapes(192, (1, 2, 3, 4), 3, (2, 4, 8), 1000, scale_shift=True),
        "lsun256": openai_shapes(256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), None, scale_shift=False),
    }
    for name, shapes in released.items():
        checkpoint = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
        assert infer_unet_config(checkpoint) == UNET_CONFIGS[name]
        converted = convert_state_dict(checkpoint, UNET_CONFIGS[name])  # every key used, every shape right
        assert len(converted) == len(shapes) + 2 * sum(".qkv." in key for key in shapes)


def test_truncated_unknown_and_mismatched_checkpoints_list_what_is_wrong(tmp_path):
    openai_sd = to_openai_state_dict(random_unet(TINY_IMAGENET))
    dropped = ["middle_block.1.proj_out.weight", "output_blocks.4.0.out_layers.3.bias"]
    torch.save({k: v for k, v in openai_sd.items() if k not in dropped}, tmp_path / "cd_partial.pt")
    with pytest.raises(ValueError, match=r"lacks 2 of the \d+ tensors.*: middle_block.1.proj_out.weight, "
                                         r"output_blocks.4.0.out_layers.3.bias\.$"):  # fmt: skip
        convert_openai_checkpoint(tmp_path / "cd_partial.pt", tmp_path / "out", sample_size=16, attention_head_dim=32)
    # A released checkpoint cut short (its last output blocks gone) is still recognised, and the gap listed.
    shapes = openai_shapes(192, (1, 2, 3, 4), 3, (2, 4, 8), 1000, scale_shift=True)
    kept = [key for key in shapes if not key.startswith(("output_blocks.11.", "out."))]
    cut = {key: torch.empty(shapes[key], device="meta") for key in kept}
    unet_config, name = resolve_unet_config(cut)
    assert name == "imagenet64"
    with pytest.raises(ValueError, match=r"lacks 32 of the 541 tensors.*: out.0.bias, .*output_blocks.11.0.emb"):
        convert_state_dict(cut, unet_config)
    data = (tmp_path / "cd_partial.pt").read_bytes()
    (tmp_path / "cd_damaged.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or truncated.*download it again"):
        load_openai_checkpoint(tmp_path / "cd_damaged.pt")
    with pytest.raises(ValueError, match="lacks 358 of the 541 tensors.*input_blocks.5.0.skip_connection.bias.*"
                                         r"also holds \d+ tensors this config does not use"):  # fmt: skip
        convert_state_dict(openai_sd, UNET_CONFIGS["imagenet64"])

    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "cd_other.pt")
    assert cli_main(["convert-openai", "--checkpoint", str(tmp_path / "cd_other.pt"), "--output", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match=r"not an OpenAI .* UNet checkpoint: it lacks \['time_embed.0.weight'"):
        convert_openai_checkpoint(tmp_path / "cd_other.pt", tmp_path / "out")

    extra = {**openai_sd, "input_blocks.1.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 tensors this UNet config does not use.*input_blocks.1.0.extra.weight"):
        convert_state_dict(extra, infer_unet_config(openai_sd, sample_size=16, attention_head_dim=32))
    with pytest.raises(ValueError, match="attention_head_dim=64 does not divide the 64 channels|pass sample_size"):
        infer_unet_config(openai_sd)
    torch.save(openai_sd, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not say whether it is a cd, ct or edm"):
        convert_openai_checkpoint(tmp_path / "model.pt", tmp_path / "out")


class Payload:
    """Pickled with a __reduce__ that would create a file if unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_with_arbitrary_objects_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": Payload(str(marker))}, tmp_path / "cd_evil.pt")
    with pytest.raises(ValueError, match="holds Python objects besides tensors.*weights_only=True refuses them"):
        load_openai_checkpoint(tmp_path / "cd_evil.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_openai_checkpoint(tmp_path / "missing.pt")
    assert not os.path.exists(tmp_path / "out")
