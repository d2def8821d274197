"""Convert OpenAI's original consistency-model checkpoints (github.com/openai/consistency_models) to diffusers.

The released `.pt` files hold the state dict of OpenAI's guided-diffusion `UNetModel` (ResBlocks with
`resblock_updown`, attention with one 1x1 `qkv` convolution in the flash-attention channel layout `(three heads
dim)`). `convert_openai_checkpoint` maps every tensor onto a diffusers `UNet2DModel` and writes:

- consistency models (`cd_*`, `ct_*`): a `ConsistencyPipeline` folder with the scheduler OpenAI trained with
  (a 40-point grid for CD, 201 for ImageNet-64 CT, 151 for LSUN-256 CT) and a model card;
- EDM teachers (`edm_*_ema.pt`): a teacher folder (`unet/` + an `EDMEulerScheduler` config) for
  `cm_diffusers.load_teacher`, to distill from.

Checkpoints are read with `torch.load(..., weights_only=True)`: a file holding anything but tensors is refused.
"""

import json
import os
import pickle
import re
from pathlib import Path

import torch

from .parameterization import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, openai_ts_to_timesteps

# The UNet2DModel configs of OpenAI's released checkpoints (as in the openai/diffusers-* Hub repos). OpenAI's
# flags: ImageNet-64 --num_channels 192 --channel_mult 1,2,3,4 --num_res_blocks 3 --attention_resolutions 32,16,8
# --num_head_channels 64 --use_scale_shift_norm True --resblock_updown True --class_cond True; LSUN-256
# --num_channels 256 --channel_mult 1,1,2,2,4,4 --num_res_blocks 2 --use_scale_shift_norm False --class_cond False.
UNET_CONFIGS = {
    "imagenet64": dict(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
        block_out_channels=(192, 384, 576, 768), attention_head_dim=64,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, upsample_type="resnet",
        downsample_type="resnet",
    ),
    "lsun256": dict(
        sample_size=256, in_channels=3, out_channels=3, layers_per_block=2, num_class_embeds=None,
        block_out_channels=(256, 256, 512, 512, 1024, 1024), attention_head_dim=64,
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3,
        resnet_time_scale_shift="default", attn_norm_num_groups=32, upsample_type="resnet",
        downsample_type="resnet",
    ),
}  # fmt: skip

# The released files: name -> (UNet config, kind, data set, OpenAI's two-step `ts` from scripts/launch.sh).
OPENAI_CHECKPOINTS = {
    "cd_imagenet64_l2.pt": ("imagenet64", "cd", "ImageNet 64x64 (class-conditional)", (0, 22, 39)),
    "cd_imagenet64_lpips.pt": ("imagenet64", "cd", "ImageNet 64x64 (class-conditional)", (0, 22, 39)),
    "ct_imagenet64.pt": ("imagenet64", "ct", "ImageNet 64x64 (class-conditional)", (0, 106, 200)),
    "cd_bedroom256_l2.pt": ("lsun256", "cd", "LSUN Bedroom 256x256", (0, 18, 39)),
    "cd_bedroom256_lpips.pt": ("lsun256", "cd", "LSUN Bedroom 256x256", (0, 17, 39)),
    "ct_bedroom256.pt": ("lsun256", "ct", "LSUN Bedroom 256x256", (0, 67, 150)),
    "cd_cat256_l2.pt": ("lsun256", "cd", "LSUN Cat 256x256", None),
    "cd_cat256_lpips.pt": ("lsun256", "cd", "LSUN Cat 256x256", None),
    "ct_cat256.pt": ("lsun256", "ct", "LSUN Cat 256x256", (0, 62, 150)),
    "edm_imagenet64_ema.pt": ("imagenet64", "edm", "ImageNet 64x64 (class-conditional)", None),
    "edm_bedroom256_ema.pt": ("lsun256", "edm", "LSUN Bedroom 256x256", None),
    "edm_cat256_ema.pt": ("lsun256", "edm", "LSUN Cat 256x256", None),
}
KINDS = ("cd", "ct", "edm")
CT_NUM_TRAIN_TIMESTEPS = {"imagenet64": 201, "lsun256": 151}  # --end_scales 200 / 150, plus one


def num_train_timesteps_for(kind: str, config_name: str) -> int:
    """The Karras grid size OpenAI trained with: 40 for CD, 201 for ImageNet-64 CT, 151 for LSUN-256 CT."""
    if kind == "cd":
        return 40
    if kind == "ct" and config_name in CT_NUM_TRAIN_TIMESTEPS:
        return CT_NUM_TRAIN_TIMESTEPS[config_name]
    raise ValueError(
        f"The training grid of a {kind} model with the {config_name} layout is unknown; pass num_train_timesteps "
        "(--num_train_timesteps), the final N of its training curriculum."
    )


# ----------------------------------------------------------------------------------------------------------------
# The key mapping: diffusers UNet2DModel <-> OpenAI UNetModel

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_ATTENTION = {"group_norm": "norm", "to_out.0": "proj_out", "to_q": "qkv", "to_k": "qkv", "to_v": "qkv"}
_QKV_INDEX = {"to_q": 0, "to_k": 1, "to_v": 2}  # flash-attention layout: qkv channels are (three, heads, dim)
_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "class_embedding": "label_emb", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0",
              "conv_out": "out.2"}  # fmt: skip


def block_map(unet_config: dict) -> dict:
    """diffusers module prefix -> (OpenAI module prefix, "resnet" | "attention"), for every block of the UNet.

    OpenAI's `input_blocks` hold, per level, `num_res_blocks` ResBlocks (each followed by attention at attention
    levels) and then one downsampling ResBlock; `output_blocks` hold `num_res_blocks + 1` ResBlocks per level, the
    last one followed by an upsampling ResBlock (after its attention, if any).
    """
    num_levels = len(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    blocks = {}
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(unet_config["down_block_types"]):
        for j in range(layers):
            blocks[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{index}.0", "resnet")
            if "Attn" in block_type:
                blocks[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{index}.1", "attention")
            index += 1
        if level < num_levels - 1:
            blocks[f"down_blocks.{level}.downsamplers.0"] = (f"input_blocks.{index}.0", "resnet")
            index += 1
    blocks["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    blocks["mid_block.attentions.0"] = ("middle_block.1", "attention")
    blocks["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    index = 0
    for level, block_type in enumerate(unet_config["up_block_types"]):
        attention = "Attn" in block_type
        for j in range(layers + 1):
            blocks[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{index}.0", "resnet")
            if attention:
                blocks[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{index}.1", "attention")
            index += 1
        if level < num_levels - 1:
            position = 2 if attention else 1  # after the last ResBlock and its attention
            blocks[f"up_blocks.{level}.upsamplers.0"] = (f"output_blocks.{index - 1}.{position}", "resnet")
    return blocks


def openai_key(diffusers_key: str, blocks: dict) -> tuple:
    """(OpenAI key, qkv index or None) holding the diffusers parameter `diffusers_key`."""
    module, _, param = diffusers_key.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{param}", None
    for prefix, (openai_prefix, kind) in blocks.items():
        if module.startswith(prefix + "."):
            sub = module[len(prefix) + 1:]
            table = _RESNET if kind == "resnet" else _ATTENTION
            if sub in table:
                return f"{openai_prefix}.{table[sub]}.{param}", _QKV_INDEX.get(sub) if kind == "attention" else None
    raise ValueError(f"No OpenAI counterpart for the diffusers parameter {diffusers_key!r}.")


def convert_state_dict(checkpoint: dict, unet_config: dict) -> dict:
    """OpenAI UNetModel state dict -> diffusers UNet2DModel state dict (float32), checking every key and shape.

    Raises a ValueError that lists the missing keys (a truncated or different checkpoint), the keys this config does
    not use, or the tensors whose shapes differ.
    """
    from diffusers import UNet2DModel

    with torch.device("meta"):
        expected = UNet2DModel.from_config(unet_config).state_dict()  # shapes only, no memory
    blocks = block_map(unet_config)
    sources = {key: openai_key(key, blocks) for key in expected}
    needed = {name for name, _ in sources.values()}
    missing = sorted(needed - set(checkpoint), key=_natural)
    unused = sorted(set(checkpoint) - needed, key=_natural)
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} of the {len(needed)} tensors this UNet needs (a truncated state "
            f"dict, or another architecture than --config): {_listing(missing)}."
            + (f" It also holds {len(unused)} tensors this config does not use." if unused else "")
        )
    if unused:
        raise ValueError(
            f"The checkpoint has {len(unused)} tensors this UNet config does not use (another architecture than "
            f"--config?): {_listing(unused)}"
        )
    converted, mismatched = {}, []
    for key, (name, qkv_index) in sources.items():
        tensor = checkpoint[name]
        if qkv_index is not None:
            if tensor.shape[0] % 3:
                mismatched.append(f"{name} {tuple(tensor.shape)} (first dimension is not 3 x channels)")
                continue
            tensor = tensor.chunk(3, dim=0)[qkv_index]
        if tensor.numel() != expected[key].numel():
            mismatched.append(f"{name} {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
            continue
        converted[key] = tensor.reshape(expected[key].shape).to(torch.float32).contiguous()  # 1x1 convs -> linear
    if mismatched:
        raise ValueError(f"{len(mismatched)} tensors have the wrong shape for this config: {_listing(mismatched)}")
    return converted


def to_openai_state_dict(unet) -> dict:
    """diffusers UNet2DModel -> OpenAI UNetModel state dict (the inverse of `convert_state_dict`).

    Attention projections come out as 1x1 convolutions `(out, in, 1, 1)` and q, k, v are stacked into one `qkv`
    tensor, as in OpenAI's consistency_models release.
    """
    blocks = block_map(unet.config)
    state, qkv_parts = {}, {}
    for key, tensor in unet.state_dict().items():
        name, qkv_index = openai_key(key, blocks)
        tensor = tensor.detach().clone()
        if ".attentions." in key or key.startswith("mid_block.attentions"):
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        if qkv_index is None:
            state[name] = tensor
        else:
            qkv_parts.setdefault(name, {})[qkv_index] = tensor
    for name, parts in qkv_parts.items():
        state[name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints and recognising their architecture


def load_openai_checkpoint(path) -> dict:
    """Reads a `.pt` state dict with `weights_only=True` (arbitrary pickled objects are refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ValueError(f"{path} is damaged or truncated ({str(error).splitlines()[0]}); download it again.")
        raise ValueError(
            f"{path} holds Python objects besides tensors, so it was not loaded: weights_only=True refuses them, as "
            "unpickling them could run arbitrary code. OpenAI's released checkpoints are plain state dicts."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path} is damaged or truncated ({str(error).splitlines()[0]}); download it again.")
    for wrapper in ("ema", "state_dict", "model"):  # some re-saved checkpoints nest the state dict
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors).")
    return checkpoint


def infer_unet_config(checkpoint: dict, sample_size=None, attention_head_dim: int = 64) -> dict:
    """The UNet2DModel config of an OpenAI UNetModel state dict, read from its keys and shapes.

    The image size and the attention head width leave no trace in the weights: `sample_size` defaults to the one
    of the released config with the same layout, and `attention_head_dim` to OpenAI's `--num_head_channels 64`.
    """
    required = ["time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.1.qkv.weight"]
    absent = [key for key in required if key not in checkpoint]
    if absent:
        raise ValueError(
            f"This is not an OpenAI consistency_models/guided-diffusion UNet checkpoint: it lacks {absent} "
            f"(it has {_listing(sorted(checkpoint, key=_natural))})."
        )
    model_channels = checkpoint["time_embed.0.weight"].shape[1]
    num_inputs = 1 + max(int(k.split(".")[1]) for k in checkpoint if k.startswith("input_blocks."))
    num_outputs = 1 + max(int(k.split(".")[1]) for k in checkpoint if k.startswith("output_blocks."))
    if any(re.match(r"(input|output)_blocks\.\d+\.\d+\.(op|conv)\.weight", k) for k in checkpoint):
        raise ValueError(
            "This checkpoint resamples with convolutions (resblock_updown=False); only OpenAI's released layout with "
            "resampling ResBlocks (resblock_updown=True) is supported."
        )
    upsampling = [i for i in range(num_outputs) if f"output_blocks.{i}.1.in_layers.0.weight" in checkpoint
                  or f"output_blocks.{i}.2.in_layers.0.weight" in checkpoint]  # fmt: skip
    layers = upsampling[0] if upsampling else num_outputs - 1
    num_levels = num_outputs // (layers + 1)
    if num_outputs != num_levels * (layers + 1) or num_inputs != num_outputs:
        raise ValueError(
            f"Unrecognised block layout: {num_inputs} input blocks and {num_outputs} output blocks do not form levels "
            f"of {layers} ResBlocks."
        )
    channels, attention = [], []
    for level in range(num_levels):
        first = f"input_blocks.{1 + level * (layers + 1)}"
        channels.append(checkpoint[f"{first}.0.out_layers.3.weight"].shape[0])
        attention.append(f"{first}.1.qkv.weight" in checkpoint)
    scale_shift = checkpoint["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * channels[0]
    num_classes = checkpoint["label_emb.weight"].shape[0] if "label_emb.weight" in checkpoint else None
    config = dict(
        sample_size=sample_size,
        in_channels=checkpoint["input_blocks.0.0.weight"].shape[1],
        out_channels=checkpoint["out.2.weight"].shape[0],
        layers_per_block=layers,
        num_class_embeds=num_classes,
        block_out_channels=tuple(channels),
        attention_head_dim=attention_head_dim,
        down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)),
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        attn_norm_num_groups=32,
        upsample_type="resnet",
        downsample_type="resnet",
    )
    if channels[0] != model_channels:
        raise ValueError(f"Unrecognised layout: time embedding width {model_channels}, first level {channels[0]}.")
    for known in UNET_CONFIGS.values():
        if _same_layout(config, known) and sample_size is None:
            config["sample_size"] = known["sample_size"]
    if config["sample_size"] is None:
        raise ValueError(
            "The image size cannot be read from the weights and this layout is not one of OpenAI's released ones "
            f"({sorted(UNET_CONFIGS)}); pass sample_size (--sample_size)."
        )
    for width, has_attention in zip(list(channels) + [channels[-1]], attention + [True]):
        if has_attention and width % attention_head_dim:
            raise ValueError(
                f"attention_head_dim={attention_head_dim} does not divide the {width} channels of an attention "
                "layer; pass the checkpoint's --num_head_channels as attention_head_dim."
            )
    return config


def resolve_unet_config(checkpoint: dict, config: str = "auto", sample_size=None, attention_head_dim: int = 64):
    """(UNet2DModel config, layout name) for `config` = "imagenet64", "lsun256" or "auto".

    With "auto", a state dict whose blocks do not form a layout (e.g. its last blocks are missing) but whose keys all
    belong to a released layout is taken as that layout, so that conversion lists exactly what is missing.
    """
    if config in UNET_CONFIGS:
        return dict(UNET_CONFIGS[config]), config
    if config != "auto":
        raise ValueError(f"config must be 'auto' or one of {sorted(UNET_CONFIGS)}, got {config!r}.")
    try:
        unet_config = infer_unet_config(checkpoint, sample_size=sample_size, attention_head_dim=attention_head_dim)
    except ValueError:
        for name, known in UNET_CONFIGS.items():
            needed = {openai_key(key, block_map(known))[0] for key in _diffusers_keys(known)}
            if set(checkpoint) < needed and len(checkpoint) > len(needed) // 2:
                return dict(known), name
        raise
    name = next((n for n, c in UNET_CONFIGS.items() if _same_layout(unet_config, c)), "custom")
    return unet_config, name


def _diffusers_keys(unet_config: dict) -> list:
    from diffusers import UNet2DModel

    with torch.device("meta"):
        return list(UNet2DModel.from_config(unet_config).state_dict())


def _same_layout(config: dict, known: dict) -> bool:
    keys = [k for k in known if k != "sample_size"]
    return all(tuple(config[k]) == tuple(known[k]) if isinstance(known[k], tuple) else config[k] == known[k]
               for k in keys)  # fmt: skip


def _natural(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _listing(items, limit: int = 12) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Writing the converted folder


def convert_openai_checkpoint(
    checkpoint_path,
    output_dir,
    config: str = "auto",
    kind=None,
    sample_size=None,
    attention_head_dim: int = 64,
    num_train_timesteps=None,
    write_card: bool = True,
) -> str:
    """
    Converts one of OpenAI's consistency-model or EDM-teacher checkpoints into a safetensors folder.

    Args:
        checkpoint_path (`str`): An OpenAI `.pt` file, e.g. `cd_imagenet64_l2.pt` or `edm_bedroom256_ema.pt`.
        output_dir (`str`): Where to write the folder.
        config (`str`, defaults to `"auto"`): `"imagenet64"`, `"lsun256"`, or `"auto"` (read from the weights).
        kind (`str`, *optional*): `"cd"`, `"ct"` (consistency models) or `"edm"` (a teacher); by default read from
            the file name (`cd_*`, `ct_*`, `edm_*`).
        sample_size (`int`, *optional*): Image size, for layouts that are not OpenAI's released ones.
        attention_head_dim (`int`, defaults to 64): OpenAI's `--num_head_channels`.
        num_train_timesteps (`int`, *optional*): The training grid size N; defaults to OpenAI's (40 for CD, 201 for
            ImageNet-64 CT, 151 for LSUN-256 CT).
        write_card (`bool`, defaults to `True`): Write a model card (consistency models only).

    Returns:
        `str`: `output_dir`.
    """
    from diffusers import UNet2DModel

    name = os.path.basename(str(checkpoint_path))
    known = OPENAI_CHECKPOINTS.get(name)
    kind = kind or (known[1] if known else _kind_from_name(name))
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    checkpoint = load_openai_checkpoint(checkpoint_path)
    unet_config, config_name = resolve_unet_config(checkpoint, config, sample_size, attention_head_dim)
    unet = UNet2DModel.from_config(unet_config)
    unet.load_state_dict(convert_state_dict(checkpoint, unet_config), strict=True)
    unet.eval()
    # a failed write (a full disk) leaves no half-written folder
    from .training.checkpoints import save_pretrained_atomic

    if kind == "edm":
        save_pretrained_atomic(lambda folder: _save_teacher(unet, folder), str(output_dir), needed_bytes=_bytes(unet))
        return str(output_dir)

    from .pipeline_consistency import ConsistencyPipeline
    from .scheduling_consistency import ConsistencyScheduler

    num_train_timesteps = num_train_timesteps or num_train_timesteps_for(kind, config_name)
    scheduler = ConsistencyScheduler(num_train_timesteps=num_train_timesteps, sigma_min=SIGMA_MIN,
                                     sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA)  # fmt: skip
    pipeline = ConsistencyPipeline(unet=unet, scheduler=scheduler)
    save_pretrained_atomic(pipeline.save_pretrained, str(output_dir), needed_bytes=_bytes(unet))
    if write_card:
        _write_card(output_dir, name, kind, known, num_train_timesteps)
    return str(output_dir)


def _bytes(module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


def _kind_from_name(name: str) -> str:
    match = re.match(r"(cd|ct|edm)[_-]", name.lower())
    if not match:
        raise ValueError(f"The file name {name!r} does not say whether it is a cd, ct or edm checkpoint; pass kind.")
    return match.group(1)


def _save_teacher(unet, output_dir):
    """A teacher folder as `training/train_diffusion.py --model_type edm` writes it, read by `load_teacher`.

    OpenAI's EDM networks take t = 250 ln sigma, diffusers' EDM schedulers 0.25 ln sigma: the scheduler config's
    `c_noise_scale` (a cm_diffusers key) tells `EDMDenoiser` to multiply by 1000.
    """
    import diffusers
    from diffusers import EDMEulerScheduler

    unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
    EDMEulerScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA).save_pretrained(
        os.path.join(output_dir, "scheduler")
    )
    config_path = os.path.join(output_dir, "scheduler", "scheduler_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["c_noise_scale"] = 1000.0
    _write_json(config_path, config)
    _write_json(os.path.join(output_dir, "model_index.json"), {
        "_class_name": "EDMUnconditionalPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "EDMEulerScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    })


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_card(output_dir, name, kind, known, num_train_timesteps):
    from .hub import save_model_card

    sampling = {"num_inference_steps": 1}
    if known and known[3]:
        sampling = {"timesteps": openai_ts_to_timesteps(known[3], num_train_timesteps)}
    save_model_card(
        output_dir,
        mode=kind,
        dataset=known[2] if known else None,
        license="mit",
        sampling=sampling,
        extra={"converted from": f"OpenAI's {name} (github.com/openai/consistency_models)",
               "training grid": f"{num_train_timesteps} points"},  # fmt: skip
        limitations=["Converted weights: quality is OpenAI's; see the paper for their FID."],
    )
