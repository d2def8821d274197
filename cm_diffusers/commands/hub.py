"""`cm-diffusers card FOLDER` writes or refreshes a model card; `cm-diffusers push FOLDER --repo_id ID` uploads the
pipeline folder to the Hugging Face Hub (configs, safetensors, card and sample grids only)."""

import json
import os

from ..argtypes import number_list, positive_int
from ..hub import MODES


def register(subparsers):
    card = subparsers.add_parser(
        "card",
        help="Write or refresh FOLDER/README.md, the model card of a saved consistency-model pipeline.",
        description="Writes FOLDER/README.md. Settings of an existing card written by cm_diffusers are kept; the "
        "flags given here replace them.",
    )
    card.add_argument("folder", help="The pipeline folder (written by ConsistencyPipeline.save_pretrained).")
    card.add_argument("--mode", choices=sorted(MODES), help="How the model was trained.")
    card.add_argument("--base_model", help="The teacher (a Hub repo id is recorded as the card's base_model).")
    card.add_argument("--dataset", help="The training data set, ideally its Hub dataset id.")
    card.add_argument("--training_command", help="The command that trained the model.")
    card.add_argument("--hardware", help='What it was trained on, e.g. "1x A100, 6 hours".')
    card.add_argument("--train_steps", type=positive_int, help="Number of training steps.")
    card.add_argument("--loss", help="The consistency loss distance, e.g. pseudo_huber or lpips.")
    card.add_argument("--num_inference_steps", type=positive_int, help="Recommended number of sampling steps.")
    card.add_argument("--timesteps", type=number_list(int, "--timesteps", low=0),
                      help='Recommended descending timesteps, e.g. "22,0".')
    card.add_argument("--sigmas", type=number_list(float, "--sigmas"),
                      help='Recommended descending noise levels, e.g. "80,0.8".')
    card.add_argument("--sample_grid", help="File name of a sample image inside FOLDER.")
    card.add_argument(
        "--eval_results",
        help="The results.json written by `cm-diffusers evaluate`, or metrics as JSON (or a JSON file), e.g. "
        '\'{"fid_1step": 12.3, "num_samples": 1000}\'. Anything without a metric is refused.',
    )
    card.add_argument("--extra", help="More settings to show, as JSON or a JSON file.")
    card.add_argument("--license", help="License id (default apache-2.0).")
    card.add_argument("--model_name", help="Title of the card (default: the folder or repo name).")
    card.add_argument("--repo_id", help="The Hub repo the usage snippet loads from.")
    card.set_defaults(func=run_card)

    push = subparsers.add_parser(
        "push",
        help="Upload a consistency-model pipeline folder to the Hugging Face Hub (never checkpoints or logs).",
    )
    push.add_argument("folder", help="The pipeline folder (written by ConsistencyPipeline.save_pretrained).")
    push.add_argument("--repo_id", required=True, help='Target repo, "user/name" or "org/name"; created if needed.')
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument(
        "--token",
        help="A Hub write token. Prefer the HF_TOKEN environment variable (or `hf auth login`): a token on the "
        "command line ends up in shell histories and process lists.",
    )
    push.add_argument("--commit_message", help="Commit message.")
    push.add_argument("--revision", help="Branch to push to (default main).")
    push.add_argument(
        "--dry_run",
        action="store_true",
        help="List the files that would be uploaded and flag local paths or tokens inside them; push nothing.",
    )
    push.set_defaults(func=run_push)


def run_card(args) -> int:
    from ..hub import load_card_info, save_model_card

    info = load_card_info(args.folder)
    for key in ("mode", "base_model", "dataset", "training_command", "hardware", "train_steps", "loss",
                "sample_grid", "license", "model_name", "repo_id"):  # fmt: skip
        if getattr(args, key) is not None:
            info[key] = getattr(args, key)
    sampling = {key: getattr(args, key) for key in ("num_inference_steps", "timesteps", "sigmas")}
    if any(value is not None for value in sampling.values()):
        info["sampling"] = {key: value for key, value in sampling.items() if value is not None}
    if args.eval_results is not None:
        info["eval_results"] = _eval_results_arg(args.eval_results)
    if args.extra is not None:
        info["extra"] = _json_arg(args.extra, "--extra")
    save_model_card(args.folder, **info)
    print(f"Wrote {os.path.join(args.folder, 'README.md')}")
    return 0


def run_push(args) -> int:
    from ..hub import check_pipeline_folder, files_to_push, find_local_paths, find_secrets, known_tokens, push_to_hub

    check_pipeline_folder(args.folder)
    upload, skipped = files_to_push(args.folder)
    print(f"Uploading {len(upload)} file(s): {', '.join(upload)}")
    if skipped:
        print(f"Keeping {len(skipped)} file(s) local (not part of the pipeline): {', '.join(skipped[:20])}"
              + (" ..." if len(skipped) > 20 else ""))
    for relative, paths in find_local_paths(args.folder, upload).items():
        print(f"Warning: {relative} mentions local path(s) that would be public: {', '.join(paths[:5])}"
              + (" ..." if len(paths) > 5 else "") + f"; rewrite the card with `cm-diffusers card {args.folder}`.")
    leaking = find_secrets(args.folder, upload, [args.token, *known_tokens()])
    if leaking:
        print(f"Warning: {', '.join(leaking)} contain(s) a Hugging Face token; push refuses to upload it.")
    if args.dry_run:
        return 0
    url = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private,
                      commit_message=args.commit_message, revision=args.revision)
    print(url)
    return 0


def _json_arg(value: str, flag: str) -> dict:
    text = open(value, encoding="utf-8").read() if os.path.isfile(value) else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} must be a JSON object or a JSON file: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(data).__name__}.")
    return data


def _eval_results_arg(value: str) -> dict:
    """--eval_results: `cm-diffusers evaluate`'s results.json (converted), or a JSON object of metrics (checked)."""
    from ..hub import check_eval_results, eval_results_from_report

    data = _json_arg(value, "--eval_results")
    if "results" in data:
        data = eval_results_from_report(data)
    return check_eval_results(data)
