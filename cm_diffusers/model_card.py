"""Model cards of consistency-model pipeline folders.

`save_model_card` renders `templates/model_card.md` with huggingface_hub's `ModelCard`/`ModelCardData`, so the YAML
metadata (license, library, tags, datasets, base model, model-index) is exactly what the Hub parses; `card
--eval_results` reads the results.json `cm-diffusers evaluate` writes (`eval_results_from_report`).

Nothing secret or local goes into a card: the training command has the values of secret flags (`--hub_token`, any
`--*key*`, `--*password*`) replaced by `REDACTED` and local paths cut to their last component, and a teacher or data
set given as a local folder is recorded by its name only.
"""

import json
import logging
import math
import os
import re
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .files import write_text_atomic
from .modes import MODES
from .redaction import redact_command, redact_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # a card's sample grid is one of these (push uploads them)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

CARD_INFO_KEYS = (
    "mode", "base_model", "dataset", "training_command", "hardware", "train_steps", "loss", "sampling",
    "sample_grid", "eval_results", "extra", "license", "model_name", "repo_id", "limitations",
)  # fmt: skip

_INFO_COMMENT = re.compile(r"<!-- cm_diffusers card info[^:]*: (\{.*\}) -->")
_METRIC_NAMES = {"fid": "FID", "kid": "KID", "is": "Inception score", "precision": "precision", "recall": "recall"}
_METRIC_KEY = re.compile(r"^(fid|kid|is|precision|recall)(?:_(.+))?$", re.IGNORECASE)
_NOT_METRICS = {"subsets", "std", "stderr", "num_samples", "samples", "seed"}  # kid_subsets is a setting, no score

# ----------------------------------------------------------------------------------------------------------------
# Model cards


def save_model_card(output_dir, **info) -> ModelCard:
    """
    Writes `output_dir/README.md`, a model card for the consistency-model pipeline saved in `output_dir`.

    Reads the architecture and noise levels from the folder's `unet/` and `scheduler/` configs when present; every
    `info` key is optional and a missing one is left out of the card.

    Args:
        output_dir (`str` or `os.PathLike`): The pipeline folder.
        mode (`str`): `"cd"`, `"ct"`, `"ict"` or `"ect"`.
        base_model (`str`): The teacher; recorded as the Hub `base_model` when it is a Hub repo id.
        dataset (`str`): The training data set (a Hub dataset id, or a description).
        training_command (`str`), hardware (`str`), train_steps (`int`), loss (`str`): How the model was trained.
        sampling (`dict`): Recommended `num_inference_steps`, `timesteps` or `sigmas`.
        sample_grid (`str`): File name of a sample image inside `output_dir`.
        eval_results (`dict`): Metrics such as `{"fid_1step": 12.3, "fid_2step": 9.8}`; non-metric keys (e.g.
            `"num_samples"`, `"reference"`) describe how they were measured.
        extra (`dict`): More settings, shown as a table.
        license (`str`, defaults to `"apache-2.0"`), model_name (`str`), repo_id (`str`, used in the usage snippet),
        limitations (`list[str]`, added to the standard ones).

    Returns:
        [`huggingface_hub.ModelCard`]: The card, already validated with `validate_model_card`.
    """
    info = _publishable({key: _plain(value) for key, value in info.items()})
    unknown = sorted(set(info) - set(CARD_INFO_KEYS))
    if unknown:
        logger.warning(f"save_model_card ignores unknown keys {unknown}; known keys: {list(CARD_INFO_KEYS)}.")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a folder; save the pipeline there first.")
    mode = info.get("mode")
    if mode is not None and mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")

    model = _describe_model(output_dir)
    sample_grid = info.get("sample_grid")
    if sample_grid is not None:
        if "/" in sample_grid or not sample_grid.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(
                f"sample_grid must be the name of an image ({', '.join(IMAGE_SUFFIXES)}) at the top of the folder, "
                f"the only images push_to_hub uploads; got {sample_grid!r}."
            )
        if not (output_dir / sample_grid).is_file():
            raise FileNotFoundError(f"sample_grid {sample_grid!r} is not a file inside {output_dir}.")
    model_name = info.get("model_name") or (info.get("repo_id") or "").split("/")[-1] or output_dir.resolve().name
    card_data = _card_data(info, model, model_name)

    sampling = info.get("sampling") or {}
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        summary=_summary(info, model),
        repo_or_path=info.get("repo_id") or "path/to/this/folder",
        sample_grid=sample_grid,
        sample_grid_caption=_grid_caption(sampling),
        class_labels_arg=", class_labels=[0, 1, 2, 3]" if model["num_classes"] else "",
        diffusers_class_arg=", class_labels=0" if model["num_classes"] else "",
        diffusers_runs=model["channels"] == 3 and model["square"],
        multistep_call=_multistep_call(sampling),
        model=model,
        model_rows=_model_rows(model, (info.get("extra") or {}).get("sigma_max")),
        num_train_timesteps=model["num_train_timesteps"],
        sampling_rows=[(f"`{key}`", _fmt(value)) for key, value in sampling.items() if value is not None],
        training_rows=_training_rows(info),
        training_command=info.get("training_command"),
        extra_rows=[(str(key), _fmt(value)) for key, value in (info.get("extra") or {}).items()],
        result_rows=[(label, _fmt(value)) for _, label, value, _ in _metrics(info.get("eval_results"))],
        result_notes=_result_notes(info.get("eval_results")),
        limitations=_limitations(info, model),
        info_json=_info_json(info),
    )
    text = redact_text(re.sub(r"\n{3,}", "\n\n", str(card)), known_tokens())  # blank lines of template blocks
    card = validate_model_card(text)
    write_text_atomic(output_dir / "README.md", str(card))
    return card


def _publishable(info: dict) -> dict:
    """`info` without secrets or local paths: a card is meant to be pushed (public by default)."""
    for key in ("base_model", "dataset"):
        value = info.get(key)
        if isinstance(value, str) and (os.path.exists(value) or value.startswith(("/", "~", "../"))):
            info[key] = f"{os.path.basename(os.path.normpath(os.path.expanduser(value)))} (a local folder)"
    if isinstance(info.get("training_command"), str):
        try:
            info["training_command"] = shlex.join(redact_command(shlex.split(info["training_command"])))
        except ValueError:  # unbalanced quotes: not a command line we can parse, redact what we can see
            info["training_command"] = redact_text(info["training_command"])
    return info


def known_tokens() -> list:
    """The Hub tokens of this environment (HF_TOKEN, the stored login), which nothing written here may contain."""
    from huggingface_hub import get_token

    tokens = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        tokens.append(get_token())
    except Exception:  # an unreadable token file is no reason to fail writing a card
        pass
    return [token for token in tokens if token]


def load_card_info(folder) -> dict:
    """The `info` a card in `folder/README.md` was written with by `save_model_card` ({} when there is none)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    match = _INFO_COMMENT.search(readme.read_text(encoding="utf-8"))
    return json.loads(match.group(1)) if match else {}


def validate_model_card(card) -> ModelCard:
    """
    Offline version of the Hub's card checks: the metadata parses strictly with `ModelCardData` (model-index
    included), survives a save/load round trip unchanged, and names the fields the Hub uses for this library.
    (`ModelCard.validate` asks the Hub itself; `push_to_hub` gets that check from the Hub when it commits.)

    Args:
        card (`ModelCard`, `str` or `os.PathLike`): A card, its text, or the path of a README.md.
    """
    if isinstance(card, (str, os.PathLike)) and not str(card).startswith("---"):
        card = Path(card).read_text(encoding="utf-8")
    if not isinstance(card, ModelCard):
        card = ModelCard(card, ignore_metadata_errors=False)
    reloaded = ModelCard(str(card), ignore_metadata_errors=False)
    if reloaded.data.to_dict() != card.data.to_dict():
        raise ValueError("The model card metadata does not survive a save/load round trip.")
    data = reloaded.data
    problems = []
    if data.library_name != "diffusers":
        problems.append(f"library_name must be 'diffusers', got {data.library_name!r}")
    if not data.license:
        problems.append("license is missing")
    if not data.tags or not all(isinstance(tag, str) for tag in data.tags):
        problems.append(f"tags must be a non-empty list of strings, got {data.tags!r}")
    for base in [data.base_model] if isinstance(data.base_model, str) else (data.base_model or []):
        if not _is_repo_id(base):
            problems.append(f"base_model {base!r} is not a Hub repo id")
    if problems:
        raise ValueError("Invalid model card metadata: " + "; ".join(problems) + ".")
    return reloaded


def _card_data(info: dict, model: dict, model_name: str) -> ModelCardData:
    mode = info.get("mode")
    tags = ["consistency-models", "cm-diffusers"]
    tags.append("class-conditional-image-generation" if model["num_classes"] else "unconditional-image-generation")
    if mode:
        tags.append(MODES[mode].tag)
    base_model = info.get("base_model")
    dataset = info.get("dataset")
    dataset = dataset if dataset and _is_dataset_id(dataset) else None  # a local folder is no Hub data set
    eval_results = None
    metrics = _metrics(info.get("eval_results"))
    if metrics and dataset:
        eval_results = [
            EvalResult(
                task_type="unconditional-image-generation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=metric,
                metric_name=label,
                metric_value=value,
                metric_config=config,
            )
            for metric, label, value, config in metrics
        ]
    return ModelCardData(
        license=info.get("license") or "apache-2.0",
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=tags,
        datasets=[dataset] if dataset else None,
        base_model=base_model if base_model and _is_repo_id(base_model) else None,
        eval_results=eval_results,
        model_name=model_name if eval_results else None,
    )


def _describe_model(folder: Path) -> dict:
    """Architecture facts for the card, from the folder's configs (empty when they are missing)."""
    unet = read_json(folder / "unet" / "config.json") or {}
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json") or {}
    size = unet.get("sample_size")
    height, width = (size, size) if isinstance(size, int) or size is None else tuple(size)
    return {
        "architecture": unet.get("_class_name"),
        "parameters": _count_parameters(folder / "unet"),
        "channels": unet.get("in_channels"),
        "resolution": f"{height}x{width}" if height else None,
        "square": height == width,
        "num_classes": unet.get("num_class_embeds"),
        "block_out_channels": unet.get("block_out_channels"),
        "num_train_timesteps": scheduler.get("num_train_timesteps", 40),
        "sigma_min": scheduler.get("sigma_min"),
        "sigma_max": scheduler.get("sigma_max"),
        "sigma_data": scheduler.get("sigma_data"),
    }


def _count_parameters(unet_dir: Path):
    from safetensors import safe_open

    files = sorted(unet_dir.glob("*.safetensors")) if unet_dir.is_dir() else []
    files = [f for f in files if f.name.count(".") == 1] or files[:1]  # skip variants such as .fp16.safetensors
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                shape = weights.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def _model_rows(model: dict, trained_sigma_max=None) -> list:
    """The model table; `trained_sigma_max` (the training settings' sigma_max) is named when sampling starts lower."""
    rows = []
    if model["architecture"]:
        params = f", {model['parameters'] / 1e6:.2f}M parameters" if model["parameters"] else ""
        rows.append(("network", f"{model['architecture']}{params}"))
    if model["resolution"]:
        rows.append(("images", f"{model['resolution']}, {model['channels']} channel(s)"))
    rows.append(("conditioning", f"{model['num_classes']} classes" if model["num_classes"] else "unconditional"))
    if model["sigma_min"] is not None:
        levels = f"sigma in [{model['sigma_min']}, {model['sigma_max']}]"
        if isinstance(trained_sigma_max, (int, float)) and trained_sigma_max > (model["sigma_max"] or 0):
            levels = f"sampled from {levels} (trained up to {trained_sigma_max})"
        rows.append((
            "noise levels",
            f"{levels}, sigma_data {model['sigma_data']}, {model['num_train_timesteps']}-point Karras grid",
        ))
    return rows


def _summary(info: dict, model: dict) -> str:
    mode = info.get("mode")
    how = f", trained with {MODES[mode].description}" if mode else ""
    size = f"{model['resolution']} " if model["resolution"] else ""
    what = f"{size}images like those of {info['dataset']}" if info.get("dataset") else f"{size}images"
    teacher = f" The teacher was `{info['base_model']}`." if info.get("base_model") else ""
    return (
        f"A consistency model (Song et al., 2023){how}. It generates {what} in a single network evaluation, or in "
        f"a few for higher quality.{teacher}"
    )


def _grid_caption(sampling: dict) -> str:
    call = _multistep_call(sampling)
    return f"Samples with {call}." if call else "Samples in one step (one network evaluation each)."


def _multistep_call(sampling: dict):
    if sampling.get("timesteps") is not None:
        return f"timesteps={list(sampling['timesteps'])}"
    if sampling.get("sigmas") is not None:
        return f"sigmas={list(sampling['sigmas'])}"
    steps = sampling.get("num_inference_steps")
    return f"num_inference_steps={steps}" if steps and steps > 1 else None


def _training_rows(info: dict) -> list:
    rows = []
    if info.get("mode"):
        rows.append(("method", MODES[info["mode"]].description))
    for key, label in (("base_model", "teacher"), ("dataset", "data"), ("train_steps", "training steps"),
                       ("loss", "loss"), ("hardware", "hardware")):  # fmt: skip
        if info.get(key) is not None:
            rows.append((label, _fmt(info[key])))
    return rows


def _metrics(eval_results) -> list:
    """(metric_type, label, value, config) for the numeric metric entries of `eval_results`."""
    rows = []
    for key, value in (eval_results or {}).items():
        if not is_metric_key(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"eval_results[{key!r}] is {value}: a card publishes only finite metrics.")
        match = _METRIC_KEY.match(str(key))
        metric, detail = match.group(1).lower(), match.group(2)
        steps = re.fullmatch(r"(\d+)_?steps?(?:_(.+))?|nfe_?(\d+)", detail or "")
        if steps:
            count = int(steps.group(1) or steps.group(3))
            detail = f"{count} step{'s' if count > 1 else ''}" + (f", {steps.group(2)}" if steps.group(2) else "")
        label = _METRIC_NAMES[metric] + (f", {detail.replace('_', ' ')}" if detail else "")
        rows.append((metric, label, float(value), re.sub(r"[^\w.]+", "-", detail) if detail else None))
    return rows


def is_metric_key(key) -> bool:
    """fid, fid_1step, kid_nfe_4, precision_2steps, ...; not settings such as kid_subsets or fid_num_samples."""
    match = _METRIC_KEY.match(str(key))
    return bool(match) and (match.group(2) or "").lower() not in _NOT_METRICS


def eval_results_from_report(report: dict) -> dict:
    """The card's `eval_results` from a `results.json` of `cm-diffusers evaluate`: FID and KID of each consistency-
    model row (`fid_1step`, `fid_2step_sigmas_80_0.821`, ...) and how they were measured. A ValueError says what is
    missing when the report cannot be read."""
    rows = report.get("results")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("Not a results file of `cm-diffusers evaluate`: it has no list of `results`.")
    consistency = [row for row in rows if row.get("sampler") == "consistency"]
    if not consistency:
        raise ValueError(
            "The evaluate results hold no consistency-model rows (only a teacher was evaluated): nothing to put on "
            "this model's card. Run `cm-diffusers evaluate --model FOLDER` first."
        )
    results = {}
    for row in consistency:
        missing = [key for key in ("steps", "fid", "kid") if not isinstance(row.get(key), (int, float))]
        if missing:
            raise ValueError(f"An evaluate result row lacks numeric {missing}: {row}.")
        suffix = f"{row['steps']}step"
        if row.get("sigmas"):
            suffix += "_sigmas_" + "_".join(f"{sigma:g}" for sigma in row["sigmas"])
        results[f"fid_{suffix}"] = row["fid"]
        results[f"kid_{suffix}"] = row["kid"]
    reference = report.get("reference") or {}
    if isinstance(reference, dict) and reference.get("source"):
        source = str(reference["source"]).split(":n=")[0]
        if source.startswith("folder:"):  # "folder:/abs/path:hash:res=16": no local paths on the card
            source = f"the folder {os.path.basename(source.split(':')[1])}"
        results["reference"] = f"{reference.get('count')} images of {source}"
    for key in ("num_samples", "seed"):
        if report.get(key) is not None:
            results[key] = report[key]
    teacher_rows = [row for row in rows if row.get("sampler") != "consistency" and isinstance(row.get("fid"), float)]
    if teacher_rows:
        best = min(teacher_rows, key=lambda row: row["fid"])
        results["teacher_best_fid"] = f"{best['fid']:.2f} ({best.get('sampler')}, NFE {best.get('nfe')})"
    return results


def check_eval_results(eval_results: dict) -> dict:
    """Refuses `eval_results` that would put nothing, or nonsense, on a card: no metric at all, a metric whose value
    is not a finite number, or nested values that are neither numbers nor text."""
    problems = []
    for key, value in eval_results.items():
        if is_metric_key(key) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{key} is {value!r}, not a number")
        elif is_metric_key(key) and not math.isfinite(value):
            problems.append(f"{key} is {value}")
        elif isinstance(value, (dict, list)):
            problems.append(f"{key} holds a {type(value).__name__}, not a number or text")
    if not any(is_metric_key(key) for key in eval_results):
        problems.append(f"no metric (fid, fid_1step, kid_2step, is, precision, recall) among {sorted(eval_results)}")
    if problems:
        raise ValueError(
            "--eval_results cannot be read: " + "; ".join(problems) + ". Pass the results.json of `cm-diffusers "
            'evaluate`, or a JSON object such as {"fid_1step": 12.3, "num_samples": 1000}.'
        )
    return eval_results


def _result_notes(eval_results) -> str:
    metric_keys = {key for key in (eval_results or {}) if is_metric_key(key)}
    notes = [f"{key}: {_fmt(value)}" for key, value in (eval_results or {}).items() if key not in metric_keys]
    return "; ".join(notes)


def _limitations(info: dict, model: dict) -> list:
    items = []
    data = info.get("dataset") or "its training data"
    size = f" at {model['resolution']}" if model["resolution"] else ""
    items.append(f"It generates images like those of {data}{size} only, and reflects that data's biases.")
    if info.get("mode") and MODES[info["mode"]].teacher in ("distill", "init"):
        items.append("Its samples cannot be better than its teacher's; one-step samples are usually somewhat worse.")
    items.append("One-step samples are less detailed than multistep ones; a few steps trade speed for quality.")
    if model["channels"] is not None and not (model["channels"] == 3 and model["square"]):
        items.append(
            "diffusers' own ConsistencyModelPipeline hard-codes 3-channel square images, so it loads but cannot "
            "sample this model; use cm_diffusers."
        )
    if _metrics(info.get("eval_results")):
        items.append("FID depends on the sample count and reference set; compare only numbers measured alike.")
    items.extend(info.get("limitations") or [])
    return items


def _plain(value):
    """Tensors, numpy values and tuples -> plain Python, so cards print and store them as numbers and lists."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _info_json(info: dict) -> str:
    kept = {key: info[key] for key in CARD_INFO_KEYS if info.get(key) is not None}
    return json.dumps(kept).replace(">", "\\u003e")  # valid JSON that cannot close the HTML comment


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_dataset_id(name: str) -> bool:
    """A Hub dataset id ("fashion_mnist", "org/name"), not a local folder or a description."""
    return not os.path.exists(name) and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_json(path: Path):
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
