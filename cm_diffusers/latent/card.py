"""The model card of a latent consistency model (LCM pipeline folder) or LCM-LoRA (adapter folder): Hub metadata,
how to load it with plain diffusers, how it was trained, and measured quality when given."""

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..files import write_text_atomic
from ..model_card import _publishable, known_tokens, validate_model_card
from ..redaction import redact_text

USAGE = {
    "lcm": """```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}")  # a LatentConsistencyModelPipeline with LCMScheduler
image = pipe("{prompt}", num_inference_steps=4, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
```""",
    "lora": """```python
import torch
from diffusers import DiffusionPipeline, LCMScheduler

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{repo}")
image = pipe("{prompt}", num_inference_steps=4, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
```""",
}


def lcd_model_card(output_dir, student: str, base_model=None, dataset=None, train_steps=None, loss=None,
                   training_command=None, guidance_scale: float = 1.0, sample_grid=None, settings=None,
                   eval_results=None, prompt: str = "a photo", repo_id=None) -> ModelCard:  # fmt: skip
    """Writes `output_dir/README.md` for an LCD result (`student` "lcm" or "lora"), validated as the Hub checks it.

    `eval_results` ({name: value}, e.g. {"fid_4step": 31.2}) become a table of measured quality.
    """
    info = _publishable(dict(base_model=base_model, dataset=dataset, training_command=training_command))
    base = info["base_model"] or "path/to/the/teacher"
    loadable_base = base if base_model and base == base_model else "path/to/the/teacher"  # not a local path
    tags = ["cm-diffusers", "text-to-image", "latent-consistency-distillation", "lcm" if student == "lcm" else "lora"]
    if student == "lora":
        tags.append("lcm-lora")
    hub_base = base_model if base_model and not os.path.exists(base_model) and base_model.count("/") == 1 else None
    data = ModelCardData(license="apache-2.0", library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         base_model=hub_base)  # fmt: skip
    what = ("a latent consistency model (LCM, Luo et al. 2023): the teacher's UNet with a guidance-scale embedding"
            if student == "lcm" else "an LCM-LoRA (Luo et al. 2023): LoRA adapters on the teacher's UNet")  # fmt: skip
    lines = [
        f"# {Path(output_dir).name}",
        "",
        f"This is {what}, distilled from `{base}` by latent consistency distillation with cm_diffusers. It "
        "generates an image from a prompt in 1-8 steps with diffusers' `LCMScheduler`.",
        "",
        "## Usage",
        "",
        USAGE[student].format(repo=repo_id or "path/to/this/folder", base=loadable_base, prompt=prompt,
                              guidance=round(guidance_scale, 2)),  # fmt: skip
        "",
    ]
    if sample_grid:
        lines += [f"![samples]({sample_grid})", ""]
    rows = [("teacher", base), ("data", info["dataset"]), ("training steps", train_steps), ("loss", loss)]
    rows += list((settings or {}).items())
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    if info.get("training_command"):
        lines += ["", "```bash", info["training_command"], "```"]
    if eval_results:
        lines += ["", "## Measured quality", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in eval_results.items()]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")
    card = validate_model_card(redact_text(str(card), known_tokens()))
    write_text_atomic(Path(output_dir) / "README.md", str(card))
    return card
