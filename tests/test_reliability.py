"""Security and failure behaviour (issue 12): secrets, NaN, resume flags, full disks, atomic outputs, commands that
read each other's files, bad flags, local paths, progress. Each test goes through a public command or API."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_unet
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler  # noqa: E402
from cm_diffusers.cli import main as cli_main  # noqa: E402
from training import train_consistency  # noqa: E402

TOKEN = "hf_fake_write_token"  # what helpers_hub.FakeHub accepts
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8,
}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """32 grayscale 16x16 images (seeded blobs)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(32):
        cy, cx, radius = rng.uniform(4, 12), rng.uniform(4, 12), rng.uniform(2, 5)
        image = 255 * rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(TINY_UNET_CONFIG))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cm")
    ConsistencyPipeline(make_tiny_unet(), ConsistencyScheduler()).save_pretrained(folder)
    return folder


def train(*flags):
    """train_consistency.main in this process, with a fresh Accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_consistency.main(train_consistency.parse_args([str(flag) for flag in flags]))


def ict_flags(data_dir, unet_config, output_dir, steps, *extra):
    return ["--mode", "ict", "--unet_config", unet_config, "--train_data_dir", data_dir, "--output_dir", output_dir,
            "--max_train_steps", steps, "--train_batch_size", 8, "--num_validation_images", 4, "--seed", 0,
            "--ema_decay", 0, "--optimizer", "adamw", *extra]  # fmt: skip


def logged_steps(output_dir):
    with open(Path(output_dir) / "logs" / "train_log.jsonl") as f:
        return [entry for entry in map(json.loads, f) if "step" in entry]


def all_text(folder):
    """Every byte under `folder`, as text (for searching secrets and paths)."""
    return "".join(path.read_bytes().decode("latin-1") for path in Path(folder).rglob("*") if path.is_file())


# ----------------------------------------------------------------------------------------------------------------
# 1. The Hub token is never published


def test_hub_token_is_in_no_card_log_or_pushed_file(data_dir, unet_config, tmp_path, monkeypatch):
    from helpers_hub import FakeHub

    out = tmp_path / "run"
    with FakeHub() as hub:
        hub.configure(monkeypatch)  # HF_TOKEN is set too: neither source may leak
        train(*ict_flags(data_dir, unet_config, out, 2), "--checkpointing_steps", 1, "--report_to", "tensorboard",
              "--push_to_hub", "--hub_model_id", "someone/tiny", "--hub_token", TOKEN)  # fmt: skip
        pushed = hub.files("someone/tiny")
    card = (out / "README.md").read_text()
    assert "--hub_token REDACTED" in card
    assert TOKEN not in all_text(out)  # card, logs, TensorBoard hparams, checkpoints
    assert not [name for name, data in pushed.items() if TOKEN.encode() in data]


def test_push_uploads_an_allow_list_and_refuses_files_holding_the_token(model_dir, tmp_path, monkeypatch, capsys):
    from helpers_hub import FakeHub

    from cm_diffusers.hub import files_to_push, push_to_hub, save_model_card

    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    save_model_card(folder, mode="ct")
    for name in ("unet/.secrets.json", "unet/credentials.json", ".env", "scheduler/.hidden.safetensors"):
        (folder / name).write_text('{"token": "hf_' + "x" * 30 + '"}')
    upload, skipped = files_to_push(folder)
    assert upload == ["README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                      "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    assert {"unet/.secrets.json", "unet/credentials.json", ".env", "scheduler/.hidden.safetensors"} <= set(skipped)

    # A token that got into an uploaded file by hand stops the push before any request.
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        (folder / "unet" / "config.json").write_text(
            (folder / "unet" / "config.json").read_text().replace("{", '{"note": "' + TOKEN + '",', 1)
        )
        with pytest.raises(ValueError, match="Refusing to push: unet/config.json contain"):
            push_to_hub(folder, "someone/x")
        assert hub.requests == []
        assert cli_main(["push", str(folder), "--repo_id", "someone/x", "--dry_run"]) == 0
        assert "contain(s) a Hugging Face token" in capsys.readouterr().out


def test_secret_flags_of_any_name_are_redacted_in_cards(model_dir, tmp_path):
    from cm_diffusers.hub import save_model_card
    from cm_diffusers.safety import redact_command

    assert redact_command(["--api_key", "abc", "--db-password=pw", "--hub_token", "t", "--lr", "1"]) == [
        "--api_key", "REDACTED", "--db-password=REDACTED", "--hub_token", "REDACTED", "--lr", "1"]  # fmt: skip
    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    secret = "hf_" + "A" * 34
    card = save_model_card(folder, training_command=f"python train.py --wandb_api_key k123 --note {secret}")
    assert "k123" not in card.text and secret not in card.text and "--wandb_api_key REDACTED" in card.text


# ----------------------------------------------------------------------------------------------------------------
# 2. NaN: a checkpoint is only written for weights that are finite and still give a finite loss


def test_divergence_names_a_finite_checkpoint_that_resumes_with_a_lower_learning_rate(data_dir, unet_config, tmp_path):
    out = tmp_path / "nan"
    # lr 0 at step 1 (warm-up), then 5e9: step 1 is a good checkpoint, the weights after step 2 are ~1e9 (finite,
    # but the next loss is NaN). The check before each checkpoint catches them: no checkpoint-2 is written.
    with pytest.raises(FloatingPointError, match=r"diverged by step 2.*last good checkpoint is .*checkpoint-1\b"):
        train(*ict_flags(data_dir, unet_config, out, 6), "--learning_rate", 1e10, "--lr_warmup_steps", 2,
              "--max_grad_norm", 0, "--checkpointing_steps", 1)  # fmt: skip
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not list(out.glob(".tmp-*")) and not (out / "model_index.json").exists()
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 100 for w in weights.values())

    # Resuming with a sane learning rate (the command line's, not the checkpoint's) continues without NaN.
    flags = ict_flags(data_dir, unet_config, out, 6, "--lr_warmup_steps", 2, "--max_grad_norm", 0,
                      "--checkpointing_steps", 1)  # fmt: skip
    assert train(*flags, "--learning_rate", 1e-4, "--resume_from_checkpoint", "latest") == 6
    log = logged_steps(out)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]  # each step once, the diverged one replaced
    assert all(np.isfinite(entry["loss"]) for entry in log) and log[-1]["lr"] == pytest.approx(1e-4)
    final = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())


def test_weights_that_blow_up_at_the_first_step_leave_no_checkpoint(data_dir, unet_config, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="diverged by step 1.*No checkpoint was saved yet"):
        train(*ict_flags(data_dir, unet_config, out, 4), "--learning_rate", 1e10, "--checkpointing_steps", 1)
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------------------------
# 3. Resume honours the optimizer flags of its command line, or refuses


def test_resume_honours_a_new_learning_rate_and_refuses_another_optimizer(data_dir, unet_config, tmp_path):
    out = tmp_path / "run"
    flags = ict_flags(data_dir, unet_config, out, 4, "--checkpointing_steps", 2)
    train(*flags, "--learning_rate", 1e-3)
    assert [entry["step"] for entry in logged_steps(out)] == [1, 2, 3, 4]
    train(*flags, "--learning_rate", 2e-4, "--adam_weight_decay", 0.01,
          "--resume_from_checkpoint", out / "checkpoint-2")  # fmt: skip
    log = logged_steps(out)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]  # steps 3 and 4 replaced, not repeated
    assert [entry["lr"] for entry in log] == pytest.approx([1e-3, 1e-3, 2e-4, 2e-4])
    with pytest.raises(ValueError, match="--optimizer adamw.*Resume with --optimizer adamw"):
        train(*flags, "--optimizer", "radam", "--resume_from_checkpoint", "latest")


# ----------------------------------------------------------------------------------------------------------------
# 4. A full disk


def test_failed_checkpoint_write_removes_the_temporary_folder_and_says_how_much_space(tmp_path):
    """A write that really fails at the file layer (RLIMIT_FSIZE: files may not grow beyond 64 kB)."""
    import resource
    import signal

    from accelerate import Accelerator

    from cm_diffusers.training_utils import save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_tiny_unet())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError, match=r"checkpoint-3 into .*\(needed ~\d.* MB, [\d,.]+ MB free\)") as info:
            save_checkpoint(accelerator, str(tmp_path), 3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert "basic_ios" not in str(info.value).split(":")[0]
    assert os.listdir(tmp_path) == []  # neither checkpoint-3 nor .tmp-checkpoint-3
    assert sum(p.numel() for p in model.parameters()) > 0


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -Urm)")
@pytest.mark.parametrize("size_kb,what", [(1024, "checkpoint-1"), (2600, "the pipeline")])
def test_a_full_disk_is_named_and_leaves_no_temporary_files(data_dir, unet_config, tmp_path, size_kb, what):
    """A real full file system: the output folder is a small tmpfs in a private mount namespace."""
    out = tmp_path / "full"
    out.mkdir()
    command = [sys.executable, str(REPO / "training" / "train_consistency.py"),
               *map(str, ict_flags(data_dir, unet_config, out, 1, "--checkpointing_steps", 1))]  # fmt: skip
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {out} && {' '.join(command)}; status=$?; "
              f"echo LISTING; ls -A {out}; exit $status")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_consistency.py: error: No space left in") and f"writing {what}" in last, last
    assert "needed ~" in last and "Traceback" not in result.stderr
    listing = result.stdout.split("LISTING")[-1].split()
    assert not [name for name in listing if name.startswith(".tmp")], listing
