"""Pushing consistency-model pipeline folders to the Hugging Face Hub (cards: `model_card.py`, re-exported here).

`push_to_hub` uploads only what a user needs to load the pipeline (an explicit allow-list: model_index.json, the
components' config files and safetensors weights, the card, sample images at the top of the folder; nothing hidden),
never training checkpoints, optimizer states, pickles or logs, in one commit whose unchanged files are skipped, so
pushing the same folder twice makes no second commit. It refuses to upload a file that contains the token it pushes
with (or HF_TOKEN's), and `push --dry_run` flags local paths left in uploaded files.
"""

import fnmatch
import logging
import re
from pathlib import Path

from .model_card import (  # noqa: F401  (the card API is also reachable as cm_diffusers.hub.*)
    IMAGE_SUFFIXES,
    MODES,
    check_eval_results,
    eval_results_from_report,
    is_metric_key,
    known_tokens,
    load_card_info,
    read_json,
    save_model_card,
    validate_model_card,
)
from .model_index import TRIGFLOW_PIPELINE_FILE, TRIGFLOW_PIPELINE_MODULE, TRIGFLOW_PIPELINE_NAME

logger = logging.getLogger(__name__)

# What a pushed pipeline folder may contain, relative to the folder. Everything else stays local.
_PUSH_TOP_LEVEL = ("model_index.json", "README.md") + tuple("*" + suffix for suffix in IMAGE_SUFFIXES)
_PUSH_COMPONENT_FILES = (
    "config.json", "scheduler_config.json", "*.safetensors", "diffusion_pytorch_model.safetensors.index.json"
)  # fmt: skip
# Absolute or home-relative paths of this machine inside a text file (URLs and relative paths do not match).
_LOCAL_PATH = re.compile(r"(?<![\w:/.\-])(?:~|/[\w.@+-]+)(?:/[\w.@+-]+)+|(?<![\w])[A-Za-z]:\\[^\s'\"`|)]+")
_PIPELINE_CLASSES = (
    "ConsistencyModelPipeline",
    "ConsistencyPipeline",
    [TRIGFLOW_PIPELINE_MODULE, TRIGFLOW_PIPELINE_NAME],
)


# ----------------------------------------------------------------------------------------------------------------
# Pushing


def check_pipeline_folder(folder) -> dict:
    """
    Checks that `folder` holds a saved consistency-model pipeline with safetensors weights, and returns its
    model_index.json; the ValueError says what the folder is instead and what to do.
    """
    from .model_index import check_is_consistency_model

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    index = read_json(folder / "model_index.json")
    if index is None:
        inside = sorted(p.parent.name for p in folder.glob("*/model_index.json"))
        hint = f" It contains pipeline folder(s) {inside}: push one of those." if inside else ""
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); save one with "
            f"ConsistencyPipeline.save_pretrained(folder).{hint}"
        )
    check_is_consistency_model(index, str(folder))
    if index.get("_class_name") not in _PIPELINE_CLASSES:
        raise ValueError(f"{folder}/model_index.json names {index.get('_class_name')!r}, not {_PIPELINE_CLASSES}.")
    for component in ("unet", "scheduler"):
        config = "config.json" if component == "unet" else "scheduler_config.json"
        if not (folder / component / config).is_file():
            raise ValueError(f"{folder}/{component}/{config} is missing; re-save the pipeline with save_pretrained.")
    if not list((folder / "unet").glob("*.safetensors")):
        raise ValueError(
            f"{folder}/unet has no safetensors weights (pickled .bin files are never pushed); re-save the pipeline "
            "with save_pretrained(folder, safe_serialization=True)."
        )
    return index


def files_to_push(folder) -> tuple[list, list]:
    """(uploaded, left out): the relative paths `push_to_hub` uploads and the ones it keeps local, both sorted."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json") or {}
    components = {name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}
    code = _pipeline_code_files(index)
    upload, skip = [], []
    inside = folder.resolve()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or not path.resolve().is_relative_to(inside):
            keep = False  # hidden files (.secrets.json, .git/) and links out of the folder are never published
        elif relative in code:
            keep = True
        elif len(parts) == 1:
            keep = any(fnmatch.fnmatch(relative, pattern) for pattern in _PUSH_TOP_LEVEL)
        elif len(parts) == 2 and parts[0] in components:
            keep = any(fnmatch.fnmatch(parts[1], pattern) for pattern in _PUSH_COMPONENT_FILES)
        else:
            keep = False  # checkpoint-*/, logs/, runs/, samples/ and anything else nested
        (upload if keep and path.is_file() else skip).append(relative)
    return upload, skip


def _pipeline_code_files(index: dict) -> set:
    """The code files a TrigFlow (sCT / sCD) folder cannot be used without: `pipeline_trigflow.py` at the top and in
    scheduler/, which plain diffusers runs with `trust_remote_code=True`. No other code file is ever pushed."""
    if index.get("_class_name") != [TRIGFLOW_PIPELINE_MODULE, TRIGFLOW_PIPELINE_NAME]:
        return set()
    return {TRIGFLOW_PIPELINE_FILE, f"scheduler/{TRIGFLOW_PIPELINE_FILE}"}


def find_local_paths(folder, files=None) -> dict:
    """{file: [local paths]} for the text files among `files` (default: what `push_to_hub` uploads) that mention
    absolute paths of this machine, which a public repo should not show."""
    folder = Path(folder)
    found = {}
    for relative in files if files is not None else files_to_push(folder)[0]:
        if not relative.endswith((".json", ".md")):
            continue
        text = (folder / relative).read_text(encoding="utf-8", errors="replace")
        paths = sorted(set(_LOCAL_PATH.findall(text)))
        if paths:
            found[relative] = paths
    return found


def find_secrets(folder, files, secrets) -> list:
    """The files among `files` that contain any of `secrets` (read in chunks, so large weights cost no memory)."""
    secrets = [secret.encode() for secret in secrets if secret]
    if not secrets:
        return []
    overlap = max(len(secret) for secret in secrets) - 1
    leaking = []
    for relative in files:
        with open(Path(folder) / relative, "rb") as f:
            tail = b""
            for block in iter(lambda: f.read(1 << 22), b""):
                window = tail + block
                if any(secret in window for secret in secrets):
                    leaking.append(relative)
                    break
                tail = window[-overlap:] if overlap else b""
    return leaking


def resolve_token(token=None) -> str:
    """The token to push with: `token`, else HF_TOKEN, else the one stored by `hf auth login`."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hub needs a write token: pass --token, set the HF_TOKEN environment variable, or run "
            "`hf auth login` once. Create a token at https://huggingface.co/settings/tokens."
        )
    return token


def push_to_hub(folder, repo_id: str, token=None, private: bool = False, commit_message=None, revision=None) -> str:
    """
    Creates the Hub repo `repo_id` (if it does not exist) and uploads the pipeline saved in `folder`.

    Only the files a user needs are uploaded (see `files_to_push`): model_index.json, the component configs and
    safetensors weights, README.md and the sample images at the top of the folder. Training checkpoints
    (`checkpoint-*/`), optimizer and RNG states, pickles (`*.pt`, `*.bin`), logs and TensorBoard events stay local.
    Files whose content is already on the Hub are skipped, so pushing an unchanged folder again creates no commit.

    Args:
        folder (`str` or `os.PathLike`): A folder written by `ConsistencyPipeline.save_pretrained`.
        repo_id (`str`): `"user/name"`, `"org/name"`, or `"name"` for the token owner's namespace.
        token (`str`, *optional*): A write token; defaults to HF_TOKEN or the stored login.
        private (`bool`, defaults to `False`): Create the repo as private (ignored when it exists).
        commit_message (`str`, *optional*): Defaults to "Upload consistency model with cm_diffusers".
        revision (`str`, *optional*): Branch to commit to; defaults to `main`.

    Returns:
        `str`: The URL of the commit (of the latest one when nothing changed).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    check_pipeline_folder(folder)
    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (e.g. HF_HUB_OFFLINE=0).")
    token = resolve_token(token)
    readme = Path(folder) / "README.md"
    if readme.is_file():
        validate_model_card(readme)
    else:
        logger.warning(f"{folder} has no README.md; write a model card first with `cm-diffusers card {folder}`.")

    upload, skipped = files_to_push(folder)
    if skipped:
        logger.info(f"Not pushing {len(skipped)} file(s) that are not part of the pipeline: {skipped[:10]}")
    leaking = find_secrets(folder, upload, [token, *known_tokens()])
    if leaking:
        raise ValueError(
            f"Refusing to push: {', '.join(leaking)} contain(s) a Hugging Face token. Remove it (re-write the card "
            f"with `cm-diffusers card {folder}`, which redacts tokens) and revoke the token if it was ever shared."
        )
    for relative, paths in find_local_paths(folder, upload).items():
        logger.warning(f"{relative} mentions local paths that will be public: {', '.join(paths[:5])}")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" -> "user/name"
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(Path(folder) / path)) for path in upload]
    commit = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload consistency model with cm_diffusers",
        revision=revision,
    )
    return commit.commit_url
