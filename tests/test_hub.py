"""Model cards, pushing through huggingface_hub's real upload code to a loopback Hub, and loading by repo id."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ConsistencyModelPipeline, DDPMPipeline, DDPMScheduler, DiffusionPipeline
from helpers import make_tiny_unet
from helpers_hub import FakeHub, make_hub_cache
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler
from cm_diffusers.cli import main as cli_main
from cm_diffusers.hub import check_pipeline_folder, files_to_push, load_card_info, push_to_hub, save_model_card

FULL_INFO = dict(
    mode="cd",
    base_model="someone/ddpm-fashion-mnist",
    dataset="zalando-datasets/fashion_mnist",
    training_command="accelerate launch training/train_consistency.py --mode cd --max_train_steps 2000",
    hardware="1x H100, 40 minutes",
    train_steps=2000,
    loss="pseudo_huber",
    sampling={"num_inference_steps": 2, "timesteps": [22, 0]},
    sample_grid="samples.png",
    eval_results={"fid_1step": 40.25, "fid_2step": 31.5, "num_samples": 1000, "reference": "5,000 train images"},
    extra={"learning_rate": 0.0001, "ema_decay": 0.95},
    repo_id="someone/fashion-mnist-cd",
)

PIPELINE_FILES = [
    "README.md",
    "model_index.json",
    "samples.png",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]


def save_pipeline(folder, in_channels=1, num_class_embeds=None, num_train_timesteps=40):
    unet = make_tiny_unet(in_channels=in_channels, num_class_embeds=num_class_embeds)
    pipe = ConsistencyPipeline(unet, ConsistencyScheduler(num_train_timesteps=num_train_timesteps))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def training_output_folder(root):
    """A pipeline folder as a training run leaves it: the pipeline plus checkpoints, logs and pickles."""
    save_pipeline(root, in_channels=3)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "samples.png")
    save_model_card(root, **FULL_INFO)
    junk = [
        "checkpoint-500/model.safetensors", "checkpoint-500/optimizer.bin", "checkpoint-500/random_states_0.pkl",
        "logs/train/events.out.tfevents.1700000000.host", "runs/events.out.tfevents.1", "optimizer.pt",
        "unet/diffusion_pytorch_model.bin", "ema/diffusion_pytorch_model.safetensors", "samples/step_100.png",
        "training_state.json", "scheduler/scheduler.pt",
    ]  # fmt: skip
    for name in junk:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\0 not for the Hub " + name.encode())
    return junk


# ----------------------------------------------------------------------------------------------------------------
# Model cards


def test_model_card_metadata_validates_and_renders_every_section(tmp_path):
    save_pipeline(tmp_path)
    Image.new("L", (16, 16)).save(tmp_path / "samples.png")
    save_model_card(tmp_path, **FULL_INFO)

    card = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert data.library_name == "diffusers" and data.license == "apache-2.0"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert data.tags == ["consistency-models", "cm-diffusers", "unconditional-image-generation",
                         "consistency-distillation"]  # fmt: skip
    assert data.base_model == "someone/ddpm-fashion-mnist"
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "fashion-mnist-cd"
    assert [(r.metric_type, r.metric_name, r.metric_value, r.dataset_type) for r in results] == [
        ("fid", "FID, 1 step", 40.25, "zalando-datasets/fashion_mnist"),
        ("fid", "FID, 2 steps", 31.5, "zalando-datasets/fashion_mnist"),
    ]

    text = card.text
    assert 'ConsistencyPipeline.from_pretrained("someone/fashion-mnist-cd")' in text
    assert 'DiffusionPipeline.from_pretrained("someone/fashion-mnist-cd")' in text
    assert "timesteps=[22, 0]" in text and "![Samples](samples.png)" in text
    assert FULL_INFO["training_command"] in text and "1x H100, 40 minutes" in text
    assert "| FID, 1 step | 40.25 |" in text and "num_samples: 1000" in text
    assert "| ema_decay | 0.95 |" in text and "hard-codes 3-channel" in text  # this model has 1 channel
    assert "\n\n\n" not in str(card) and "None" not in text
    assert load_card_info(tmp_path) == FULL_INFO


def test_model_card_with_no_info_and_a_local_class_conditional_teacher(tmp_path):
    save_pipeline(tmp_path, in_channels=3, num_class_embeds=10)
    card = save_model_card(tmp_path)
    assert card.data.to_dict() == {
        "library_name": "diffusers", "license": "apache-2.0", "pipeline_tag": "unconditional-image-generation",
        "tags": ["consistency-models", "cm-diffusers", "class-conditional-image-generation"],
    }  # fmt: skip
    assert "None" not in card.text and "class_labels=[0, 1, 2, 3]" in card.text
    assert "No evaluation results were recorded" in card.text and "10 classes" in card.text

    # A teacher given as a local folder is named (by its last path component only, never its path) but is no Hub
    # base_model; FID without a data set id stays in the table only (the Hub's model-index needs a data set).
    card = save_model_card(tmp_path, mode="ect", base_model=str(tmp_path), eval_results={"fid_1step": 9.0},
                           license="mit", dataset=str(tmp_path), sampling={"sigmas": torch.tensor([80.0, 0.5])})
    assert card.data.base_model is None and card.data.datasets is None and card.data.license == "mit"
    assert "sigmas=[80.0, 0.5]" in card.text and load_card_info(tmp_path)["sampling"] == {"sigmas": [80.0, 0.5]}
    assert str(tmp_path) not in card.text and f"{tmp_path.name} (a local folder)" in card.text
    assert "| FID, 1 step | 9 |" in card.text
    assert "model-index" not in card.data.to_dict()


def test_model_card_input_errors(tmp_path):
    save_pipeline(tmp_path)
    with pytest.raises(ValueError, match="Unknown mode 'cm'"):
        save_model_card(tmp_path, mode="cm")
    with pytest.raises(FileNotFoundError, match="grid.png"):
        save_model_card(tmp_path, sample_grid="grid.png")
    with pytest.raises(ValueError, match="top of the folder"):
        save_model_card(tmp_path, sample_grid="samples/grid.png")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        save_model_card(tmp_path / "missing")


def test_card_command_writes_then_refreshes_keeping_earlier_settings(tmp_path, capsys):
    save_pipeline(tmp_path)
    folder = str(tmp_path)
    assert cli_main(["card", folder, "--mode", "ct", "--dataset", "zalando-datasets/fashion_mnist",
                     "--sigmas", "80,0.8"]) == 0  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps({"fid_1step": 20.5, "num_samples": 500}))
    assert cli_main(["card", folder, "--eval_results", str(tmp_path / "eval.json"), "--repo_id", "me/ct"]) == 0
    info = load_card_info(tmp_path)
    assert info["mode"] == "ct" and info["sampling"] == {"sigmas": [80.0, 0.8]}
    assert info["eval_results"] == {"fid_1step": 20.5, "num_samples": 500}
    card = ModelCard.load(tmp_path / "README.md")
    assert "consistency-training" in card.data.tags and "sigmas=[80.0, 0.8]" in card.text
    assert cli_main(["card", folder, "--eval_results", "[1, 2]"]) == 1
    assert "--eval_results must be a JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Pushing through huggingface_hub's real client to a loopback Hub


def test_push_uploads_exactly_the_pipeline_files(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    junk = training_output_folder(folder)
    assert files_to_push(folder) == (PIPELINE_FILES, sorted(junk))
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        assert cli_main(["push", str(folder), "--repo_id", "someone/fashion-mnist-cd", "--dry_run"]) == 0
        assert hub.requests == []
        url = push_to_hub(folder, "someone/fashion-mnist-cd", private=True, commit_message="First model")

        files = hub.files("someone/fashion-mnist-cd")
        assert sorted(files) == PIPELINE_FILES
        assert all(files[name] == (folder / name).read_bytes() for name in PIPELINE_FILES)
        (commit,) = hub.commits
        assert url == f"{hub.url}/someone/fashion-mnist-cd/commit/{commit['oid']}"
        assert commit["summary"] == "First model" and hub.repos["someone/fashion-mnist-cd"]["private"]
        # Weights and images travel over LFS, text files inline; the Hub validated the card's metadata.
        assert {name for name, how in commit["files"].items() if how == "lfs"} == {
            "samples.png", "unet/diffusion_pytorch_model.safetensors"}  # fmt: skip
        assert hub.validated_readmes == [(folder / "README.md").read_text()]


def test_push_twice_is_a_no_op_and_a_changed_card_is_one_small_commit(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    training_output_folder(folder)
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        first = push_to_hub(folder, "someone/cd")
        requests_before = len(hub.requests)
        assert push_to_hub(folder, "someone/cd") == first  # nothing changed: no new commit, same URL
        assert len(hub.commits) == 1
        assert [method for method, _ in hub.requests[requests_before:]].count("PUT") == 0  # no bytes re-sent

        save_model_card(folder, **{**FULL_INFO, "eval_results": {"fid_1step": 12.0}})
        assert cli_main(["push", str(folder), "--repo_id", "someone/cd", "--commit_message", "New FID"]) == 0
        assert capsys.readouterr().out.strip().endswith(hub.commits[-1]["oid"])
        assert len(hub.commits) == 2 and hub.commits[1]["files"] == {"README.md": "regular"}
        assert hub.files("someone/cd")["README.md"] == (folder / "README.md").read_bytes()
        # A new branch starts from main, so the same folder pushed there is again no new commit.
        push_to_hub(folder, "someone/cd", revision="dev")
        assert hub.files("someone/cd", "dev") == hub.files("someone/cd") and len(hub.commits) == 2


def test_push_without_token_fails_clearly_before_any_request(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    training_output_folder(folder)
    with FakeHub() as hub:
        hub.configure(monkeypatch, token=False)
        with pytest.raises(ValueError, match="needs a write token.*HF_TOKEN.*hf auth login"):
            push_to_hub(folder, "someone/cd")
        assert cli_main(["push", str(folder), "--repo_id", "someone/cd"]) == 1
        assert "needs a write token" in capsys.readouterr().err
        assert hub.requests == []
        # Offline mode is reported as such, not as a network failure.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
            push_to_hub(folder, "someone/cd", token=hub.token)


def test_push_refuses_folders_that_are_not_consistency_pipelines(tmp_path):
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="not a consistency-model pipeline.*DDPMPipeline"):
        push_to_hub(tmp_path / "ddpm", "someone/x", token="unused")
    (tmp_path / "run" / "logs").mkdir(parents=True)
    save_pipeline(tmp_path / "run" / "pipeline")
    with pytest.raises(ValueError, match=r"no model_index.json.*\['pipeline'\]"):
        check_pipeline_folder(tmp_path / "run")
    os.remove(tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="no safetensors weights"):
        check_pipeline_folder(tmp_path / "run" / "pipeline")


# ----------------------------------------------------------------------------------------------------------------
# Loading by repo id


def test_what_we_push_loads_by_repo_id_with_both_pipelines(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    training_output_folder(folder)
    source = ConsistencyPipeline.from_pretrained(folder)
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        push_to_hub(folder, "someone/cd-rgb")
        pushed = hub.files("someone/cd-rgb")
        head = hub.repos["someone/cd-rgb"]["branches"]["main"]["head"]
    downloaded = tmp_path / "downloaded"
    for name, data in pushed.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    cache = tmp_path / "cache"
    snapshot = make_hub_cache(downloaded, "someone/cd-rgb", cache, commit=head)
    assert os.path.islink(snapshot / "unet" / "diffusion_pytorch_model.safetensors")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    call = dict(batch_size=2, latents=latents, timesteps=[22, 0], output_type="pt")
    expected = source(**call, generator=torch.manual_seed(1)).images
    ours = ConsistencyPipeline.from_pretrained("someone/cd-rgb", cache_dir=str(cache))
    plain = DiffusionPipeline.from_pretrained("someone/cd-rgb", cache_dir=str(cache))
    assert isinstance(plain, ConsistencyModelPipeline)
    plain.set_progress_bar_config(disable=True)
    images = ours(**call, generator=torch.manual_seed(1)).images
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    theirs = plain(**call, generator=torch.manual_seed(1)).images
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)


def test_a_pushed_trigflow_model_carries_its_pipeline_code_and_loads_by_repo_id(tmp_path, monkeypatch):
    """A TrigFlow (sCT/sCD) folder is only usable by plain diffusers with its pipeline file: push uploads exactly
    the files model_index.json names, and the repo id loads in both pipelines with the same images."""
    from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

    folder = tmp_path / "run"
    source = ConsistencyPipeline(unet=make_tiny_unet(seed=6), scheduler=TrigFlowSCMScheduler(sigma_max=80.0))
    source.set_progress_bar_config(disable=True)
    source.save_pretrained(folder)
    Image.new("L", (32, 32), 128).save(folder / "samples.png")
    save_model_card(folder, **FULL_INFO)
    (folder / "helper.py").write_text("print('a local script, not named by model_index.json')\n")
    uploaded, skipped = files_to_push(folder)
    assert {"pipeline_trigflow.py", "scheduler/pipeline_trigflow.py"} <= set(uploaded) and skipped == ["helper.py"]
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        push_to_hub(folder, "someone/scd")
        pushed = hub.files("someone/scd")
        head = hub.repos["someone/scd"]["branches"]["main"]["head"]
    assert sorted(pushed) == uploaded
    downloaded = tmp_path / "downloaded"
    for name, data in pushed.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    cache = tmp_path / "cache"
    make_hub_cache(downloaded, "someone/scd", cache, commit=head)

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ours = ConsistencyPipeline.from_pretrained("someone/scd", cache_dir=str(cache))
    plain = DiffusionPipeline.from_pretrained("someone/scd", cache_dir=str(cache), trust_remote_code=True)
    assert type(plain).__name__ == "TrigFlowPipeline"
    plain.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        call = dict(batch_size=2, num_inference_steps=steps, output_type="np")
        expected = source(**call, generator=torch.manual_seed(3)).images
        np.testing.assert_array_equal(ours(**call, generator=torch.manual_seed(3)).images, expected)
        np.testing.assert_allclose(plain(**call, generator=torch.manual_seed(3)).images, expected, rtol=0, atol=1e-5)


def test_repo_id_of_a_diffusion_model_says_what_it_is(tmp_path, monkeypatch):
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    make_hub_cache(tmp_path / "ddpm", "someone/ddpm", tmp_path / "cache")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="someone/ddpm is not a consistency-model pipeline.*DDPMPipeline"):
        ConsistencyPipeline.from_pretrained("someone/ddpm", cache_dir=str(tmp_path / "cache"))


def test_loads_by_repo_id_from_the_default_cache_in_a_fresh_process(tmp_path):
    """HF_HOME, not cache_dir: what a user gets after `hf download` or a first online load."""
    save_pipeline(tmp_path / "pipe")
    make_hub_cache(tmp_path / "pipe", "someone/cd-gray", tmp_path / "home" / "hub")
    script = (
        "import diffusers, cm_diffusers\n"
        "pipe = cm_diffusers.ConsistencyPipeline.from_pretrained('someone/cd-gray')\n"
        "plain = diffusers.DiffusionPipeline.from_pretrained('someone/cd-gray')\n"
        "print(type(pipe).__name__, type(plain).__name__, pipe(output_type='pt').images.shape)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ConsistencyPipeline", "ConsistencyModelPipeline", "torch.Size([1,", "1,",
                                     "16,", "16])"]  # fmt: skip
