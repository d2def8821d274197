"""Security and failure behaviour: secrets, NaN, resume flags, full disks, atomic outputs, commands that
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


def test_secret_flags_of_any_name_are_redacted_in_cards(model_dir, tmp_path, monkeypatch):
    from cm_diffusers.hub import save_model_card
    from cm_diffusers.redaction import redact_command

    assert redact_command(["--api_key", "abc", "--db-password=pw", "--hub_token", "t", "--lr", "1"]) == [
        "--api_key", "REDACTED", "--db-password=REDACTED", "--hub_token", "REDACTED", "--lr", "1"]  # fmt: skip
    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    secret = "hf_" + "A" * 34
    card = save_model_card(folder, training_command=f"python train.py --wandb_api_key k123 --note {secret}")
    assert "k123" not in card.text and secret not in card.text and "--wandb_api_key REDACTED" in card.text
    monkeypatch.setenv("HF_TOKEN", "my-env-token-1234")  # whatever its shape, the environment's token never shows
    card = save_model_card(folder, training_command="HF_TOKEN=my-env-token-1234 python train.py", extra={"x": 1})
    assert "my-env-token-1234" not in (folder / "README.md").read_text()


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

    from cm_diffusers.training.checkpoints import save_checkpoint

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


@pytest.mark.slow  # a training script in a subprocess each: ~20 s on 2 shared cores
@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -Urm)")
@pytest.mark.parametrize("script,size_kb,what", [("train_consistency", 1024, "checkpoint-1"),
                                                 ("train_consistency", 2600, "the pipeline"),
                                                 ("train_diffusion", 2600, "the pipeline")])  # fmt: skip
def test_a_full_disk_is_named_and_leaves_no_temporary_files(data_dir, unet_config, tmp_path, script, size_kb, what):
    """A real full file system: the output folder is a small tmpfs in a private mount namespace."""
    out = tmp_path / "full"
    out.mkdir()
    if script == "train_consistency":
        flags = ict_flags(data_dir, unet_config, out, 1, "--checkpointing_steps", 1)
    else:
        flags = ["--output_dir", out, "--train_data_dir", data_dir, "--unet_config", unet_config, "--resolution", 16,
                 "--max_train_steps", 1, "--train_batch_size", 8, "--checkpointing_steps", 1, "--report_to", "none",
                 "--num_validation_images", 4, "--validation_inference_steps", 2]  # fmt: skip
    command = [sys.executable, str(REPO / "training" / f"{script}.py"), *map(str, flags)]
    shell = (f"mount -t tmpfs -o size={size_kb}k tmpfs {out} && {' '.join(command)}; status=$?; "
             f"echo LISTING; ls -A {out}; exit $status")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", shell], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}.py: error: No space left in") and f"writing {what}" in last, last
    assert "needed ~" in last and "Traceback" not in result.stderr
    listing = result.stdout.split("LISTING")[-1].split()
    assert not [name for name in listing if name.startswith(".tmp")], listing


# ----------------------------------------------------------------------------------------------------------------
# 5. `generate` checks its outputs before generating and writes atomically


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command loads a pipeline: its flags should have been refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was reported")

    monkeypatch.setattr(ConsistencyPipeline, "from_pretrained", refuse)


def test_generate_refuses_bad_output_paths_before_generating(model_dir, tmp_path, capsys, no_model_load):
    common = ["generate", "--model", str(model_dir), "--num_images", "2"]
    for output, message in [(tmp_path / "grid.txt", "image extension"), (tmp_path / "grid", "no extension"),
                            (tmp_path, "is a folder")]:  # fmt: skip
        assert cli_main(common + ["--output", str(output)]) == 1
        assert message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert cli_main(common + ["--output", str(tmp_path / "a_file" / "grid.png")]) == 1
    assert "is a file" in capsys.readouterr().err
    assert cli_main(common + ["--output", str(tmp_path / "g.png"), "--save_images_dir", str(tmp_path / "a_file")]) == 1
    assert "--save_images_dir" in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_generate_replaces_its_output_atomically(model_dir, tmp_path):
    output = tmp_path / "grid.png"
    Image.new("L", (5, 5), 77).save(output)
    before = output.read_bytes()
    with open(output, "rb") as reader:  # a reader (or a second writer) of the old file
        assert cli_main(["generate", "--model", str(model_dir), "--num_images", "2", "--output", str(output)]) == 0
        assert reader.read() == before  # the old file was replaced by a rename, never rewritten in place
    assert Image.open(output).size != (5, 5)
    assert [path.name for path in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------------
# 7. `card` reads what `evaluate` writes


def evaluate_report(tmp_path):
    """A results.json exactly as `cm-diffusers evaluate` writes it (write_report), for a model and its teacher."""
    from cm_diffusers.evaluation import write_report

    rows = [dict(model="tiny-cd", sampler="consistency", steps=1, nfe=1, fid=41.5, kid=0.02, kid_std=0.001,
                 ms_per_image=3.0, images_per_second=333.0, num_samples=100, seconds=0.3),
            dict(model="tiny-cd", sampler="consistency", steps=2, nfe=2, sigmas=[80.0, 0.821], fid=33.25, kid=0.015,
                 kid_std=0.001, ms_per_image=6.0, images_per_second=166.0, num_samples=100, seconds=0.6),
            dict(model="teacher ddpm", sampler="heun", steps=5, nfe=9, fid=30.0, kid=0.01, kid_std=0.001,
                 ms_per_image=30.0, images_per_second=33.0, num_samples=100, seconds=3.0)]  # fmt: skip
    report = {"model": "tiny-cd", "teacher": "ddpm", "num_samples": 100, "batch_size": 50, "seed": 0,
              "device": "cpu", "device_name": "cpu", "torch_threads": 1, "torch": torch.__version__,
              "reference": {"source": "fashion-mnist-train:res=16:n=500", "count": 500},
              "feature_extractor": "inception", "kid_subsets": 10, "ms_per_image": "generation only",
              "results": rows}  # fmt: skip
    write_report(report, str(tmp_path), "title")
    return tmp_path / "results.json"


def test_card_reads_the_results_file_of_evaluate(model_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from cm_diffusers.hub import load_card_info, save_model_card

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    results = evaluate_report(tmp_path)
    assert cli_main(["card", str(folder), "--dataset", "zalando-datasets/fashion_mnist",
                     "--eval_results", str(results)]) == 0  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    metrics = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert metrics == {("fid", "1-step"): 41.5, ("kid", "1-step"): 0.02, ("fid", "2-steps-sigmas_80_0.821"): 33.25,
                       ("kid", "2-steps-sigmas_80_0.821"): 0.015}  # fmt: skip
    assert "kid_subsets" not in str(load_card_info(folder)["eval_results"])
    assert "500 images of fashion-mnist-train" in card.text and "30.00 (heun, NFE 9)" in card.text
    assert str(tmp_path) not in card.text

    # What it cannot read is refused, and the card stays as it was.
    before = (folder / "README.md").read_text()
    for bad, message in [({"kid_subsets": 10, "num_samples": 5}, "no metric"), ({"fid_1step": "n/a"}, "not a number"),
                         ({"results": [{"sampler": "heun", "fid": 3.0}]}, "no consistency-model rows"),
                         ({"fid_1step": float("nan")}, "fid_1step is nan")]:  # fmt: skip
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert cli_main(["card", str(folder), "--eval_results", str(tmp_path / "bad.json")]) == 1
        assert message in capsys.readouterr().err
    assert (folder / "README.md").read_text() == before
    with pytest.raises(ValueError, match="only finite metrics"):
        save_model_card(folder, eval_results={"fid_1step": float("inf")})


# ----------------------------------------------------------------------------------------------------------------
# 8. Nonsense flags are refused when the command line is parsed, naming the flag


def parse_error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_numeric_flags_are_validated_at_parse_time_naming_the_flag(capsys, tmp_path, no_model_load):
    from training import train_diffusion

    base = ["--mode", "ct", "--output_dir", str(tmp_path), "--dataset_name", "fashion_mnist"]
    for flag, value in [("--resolution", "0"), ("--resolution", "-5"), ("--learning_rate", "nan"),
                        ("--sigma_max", "inf"), ("--train_batch_size", "0"), ("--ema_decay", "1.5"),
                        ("--checkpointing_steps", "-1"), ("--dropout", "1")]:  # fmt: skip
        assert f"argument {flag}: must" in parse_error(capsys, train_consistency.parse_args, base + [flag, value])
    assert "--sigma_min" in parse_error(capsys, train_consistency.parse_args, base + ["--sigma_min", "90"])
    base = ["--output_dir", str(tmp_path), "--dataset_name", "fashion_mnist"]
    for flag, value in [("--resolution", "0"), ("--checkpointing_steps", "0"), ("--adam_beta1", "nan")]:
        assert f"argument {flag}: must" in parse_error(capsys, train_diffusion.parse_args, base + [flag, value])
    from cm_diffusers.cli import build_parser

    for argv in (["generate", "--steps", "0"], ["generate", "--sigmas", "80,nan"], ["generate", "--nrow", "-1"],
                 ["evaluate", "--num_samples", "1"], ["benchmark", "--teacher", "t", "--batch_size", "0"],
                 ["edit", "denoise", "--image", "x.png", "--sigma", "nan"],
                 ["card", "f", "--sigmas", "nan"]):  # fmt: skip
        flag = next(arg for arg in argv[::-1] if arg.startswith("--"))
        assert f"argument {flag}:" in parse_error(capsys, build_parser().parse_args, argv)


def test_the_teacher_is_checked_before_any_data_loads(data_dir, tmp_path, capsys, monkeypatch):
    base = ["--mode", "cd", "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(data_dir)]
    err = parse_error(capsys, train_consistency.parse_args, base + ["--teacher_model_name_or_path", "/no/such/dir"])
    assert "--teacher_model_name_or_path /no/such/dir: no such folder" in err
    err = parse_error(capsys, train_consistency.parse_args, base + ["--teacher_model_name_or_path", str(tmp_path)])
    assert "holds no diffusers model" in err
    # A folder that looks like a model but is none: main() fails on it before building the data set.
    (tmp_path / "bad" / "unet").mkdir(parents=True)
    (tmp_path / "bad" / "unet" / "config.json").write_text("{}")
    monkeypatch.setattr(train_consistency, "build_dataset", lambda args: pytest.fail("data loaded before the teacher"))
    with pytest.raises((ValueError, OSError)):
        train(*base, "--teacher_model_name_or_path", tmp_path / "bad")


# ----------------------------------------------------------------------------------------------------------------
# 9. `evaluate` names rows by model and warns when the reference is not the model's training data


def test_evaluate_warns_about_the_reference_and_names_rows_by_model(model_dir, tmp_path, capsys):
    from cm_diffusers.hub import save_model_card

    folder = tmp_path / "my-model"
    shutil.copytree(model_dir, folder)
    save_model_card(folder, dataset="someone/cats", model_name="tiny-cats-cd")
    references = tmp_path / "refs"
    references.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(references / f"{i}.png")
    common = ["evaluate", "--model", str(folder), "--steps", "1", "--num_samples", "2", "--batch_size", "2",
              "--reference_num_samples", "4", "--cache_dir", str(tmp_path / "cache"), "--no_progress"]  # fmt: skip
    assert cli_main(common + ["--reference", str(references), "--output_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "is not the data tiny-cats-cd was trained on (its card says someone/cats)" in out
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [row["model"] for row in report["results"]] == ["tiny-cats-cd"]

    save_model_card(folder, dataset=str(references), model_name="tiny-cats-cd")  # trained on that very folder
    assert cli_main(common + ["--reference", str(references), "--output_dir", str(tmp_path / "b")]) == 0
    assert "is not the data" not in capsys.readouterr().out


def test_reference_statistics_say_what_they_cost_up_front(tmp_path, caplog):
    from cm_diffusers.evaluation import InceptionFeatureExtractor, reference_statistics

    for i in range(3):
        Image.fromarray(np.full((16, 16), 80 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with caplog.at_level("WARNING"):
        reference_statistics(str(tmp_path), InceptionFeatureExtractor(), cache_dir=None, progress=False)
    assert "Computing the Inception statistics of 3 reference images" in caplog.text and "takes about" in caplog.text


def test_nan_samples_give_no_fid():
    from cm_diffusers.evaluation import to_uint8_images

    images = torch.rand(2, 1, 4, 4)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 32 pixel values are NaN"):
        to_uint8_images(images)


# ----------------------------------------------------------------------------------------------------------------
# 10. Cards record names, not local paths; `push --dry_run` flags any that remain


def test_cards_hold_no_local_paths_and_dry_run_flags_them(data_dir, unet_config, tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler

    teacher = tmp_path / "my-teacher"
    DDPMPipeline(unet=make_tiny_unet(seed=1), scheduler=DDPMScheduler()).save_pretrained(teacher)
    out = tmp_path / "run"
    flags = ict_flags(data_dir, unet_config, out, 1)
    flags[flags.index("ict")] = "ect"
    train(*flags, "--teacher_model_name_or_path", teacher)
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(data_dir) not in card and str(unet_config) not in card
    assert f"{data_dir.name} (a local folder)" in card and "--unet_config config.json" in card
    assert "my-teacher (a local folder)" in card and "--teacher_model_name_or_path my-teacher" in card
    assert cli_main(["push", str(out), "--repo_id", "someone/x", "--dry_run"]) == 0
    assert "local path" not in capsys.readouterr().out

    (out / "README.md").write_text(card + f"\nTrained from {data_dir}/train on /home/alice/data.\n")
    assert cli_main(["push", str(out), "--repo_id", "someone/x", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "README.md mentions local path(s) that would be public" in printed
    assert f"{data_dir}/train" in printed and "/home/alice/data" in printed


# ----------------------------------------------------------------------------------------------------------------
# 11. Progress: images/s, and no "Downloading data" for a local folder


def test_training_bar_shows_images_per_second_and_no_download_for_local_images(data_dir, unet_config, tmp_path,
                                                                              capfd):  # fmt: skip
    train(*ict_flags(data_dir, unet_config, tmp_path / "run", 2))
    err = capfd.readouterr().err
    assert "images/s=" in err and ("step/s" in err or "s/step" in err)
    assert "Downloading data" not in err
