"""End-to-end runs of training/train_consistency.py on tiny models: every mode, resume, two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import TINY_UNET_CONFIG, make_tiny_unet
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_diffusers.hub import MODES  # noqa: E402
from cm_diffusers.losses import Curriculum, DenoiserLoss, Levels, PseudoHuber, build_loss  # noqa: E402
from cm_diffusers.networks import unet_forward  # noqa: E402
from cm_diffusers.training.loop import weights_digest  # noqa: E402
from cm_diffusers.training.runtime import default_unet_config  # noqa: E402
from training import train_consistency  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory):
    """A tiny (untrained) DDPM eps-model folder: a real diffusers teacher for the loss path."""
    path = tmp_path_factory.mktemp("teacher")
    DDPMPipeline(unet=make_tiny_unet(seed=1), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def train(*flags):
    """Runs the script's main() in this process (a fresh Accelerate state each time); returns the global step."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_consistency.main(train_consistency.parse_args([str(flag) for flag in flags]))


def read_log(output_dir, name="train_log.jsonl"):
    with open(Path(output_dir) / "logs" / name) as f:
        return [json.loads(line) for line in f]


def steps_of(log):
    return [entry for entry in log if "step" in entry]


def common_flags(data_dir, output_dir, steps):
    return ["--train_data_dir", data_dir, "--output_dir", output_dir, "--max_train_steps", steps,
            "--train_batch_size", 8, "--num_validation_images", 4, "--seed", 0]  # fmt: skip


def assert_pipeline_samples(output_dir, schedule):
    from cm_diffusers import ConsistencyPipeline

    pipe = ConsistencyPipeline.from_pretrained(output_dir)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", **schedule).images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    assert (Path(output_dir) / "unet" / WEIGHTS).is_file()
    return pipe


def load_images(folder):
    paths = sorted(Path(folder).glob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32))[None] / 127.5 - 1 for p in paths])


def eval_loss(mode, unet, images, levels, sigma_min=0.002, sigma_max=80.0, teacher=None, repeats=4):
    """The mode's loss of `unet` (no dropout) on all images; the same noise and levels for every model evaluated."""
    loss_fn = build_loss(mode, PseudoHuber(), teacher=teacher, sigma_min=sigma_min, sigma_max=sigma_max)
    network = unet_forward(unet.eval())
    torch.manual_seed(123)
    with torch.no_grad():
        return float(np.mean([loss_fn(network, network, images, levels)[0].item() for _ in range(repeats)]))


def seeded_init(config, seed=0):
    """The student the script builds without a teacher: `--seed` seeds its weights."""
    torch.manual_seed(seed)
    return UNet2DModel.from_config(config)


def assert_card(output_dir, mode, *settings):
    card = (Path(output_dir) / "README.md").read_text()
    assert MODES[mode][1] in card and "samples_2step.png" in card
    for setting in settings:
        assert setting in card


# Short runs on fixed-size grids (s0 = s1 for iCT; CT's N(k) runs from s0 to s1 + 1), AdamW without warm-up so
# that 12-16 steps move the tiny UNet measurably. The loss is compared on a fixed evaluation (same images, noise and
# levels for the initial and the trained model): the logged per-step losses are dominated by the random levels.
LOSS_FLAGS = ["--optimizer", "adamw", "--learning_rate", 3e-3, "--ema_decay", 0]
MODE_FLAGS = {"ct": {"s0": 40, "s1": 40, "mu0": 0.9}, "ict": {"s0": 10, "s1": 10, "dropout": 0.1}}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ct", "ict"])
def test_training_from_data_lowers_loss_and_saves_pipeline(mode, data_dir, unet_config, tmp_path):
    out, steps, settings = tmp_path / mode, 16, MODE_FLAGS[mode]
    mode_flags = [item for name, value in settings.items() for item in (f"--{name}", value)]
    assert train(*common_flags(data_dir, out, steps), "--mode", mode, "--unet_config", unet_config, *LOSS_FLAGS,
                 *mode_flags) == steps  # fmt: skip

    log = steps_of(read_log(out))
    curriculum = Curriculum(mode, steps, s0=settings["s0"], s1=settings["s1"], mu0=settings.get("mu0", 0.9))
    assert [entry["step"] for entry in log] == list(range(1, steps + 1))
    assert [(entry["num_scales"], entry["target_ema"]) for entry in log] == [
        (curriculum(k).num_scales, pytest.approx(curriculum(k).target_ema)) for k in range(steps)
    ]
    levels = curriculum(steps)
    pipe = assert_pipeline_samples(out, {"timesteps": [levels.num_scales // 2, 0]})
    assert pipe.scheduler.config.num_train_timesteps == levels.num_scales  # the grid of the final step
    images = load_images(data_dir)
    before = eval_loss(mode, seeded_init(TINY_UNET_CONFIG), images, levels)
    after = eval_loss(mode, pipe.unet, images, levels)
    assert after < 0.97 * before
    assert_card(out, mode, "s0", "s1")


@pytest.mark.slow
def test_cd_distills_ddpm_teacher(data_dir, ddpm_teacher, tmp_path):
    from cm_diffusers.teachers import load_teacher

    out, steps = tmp_path / "cd", 12
    assert train(*common_flags(data_dir, out, steps), "--mode", "cd", "--teacher_model_name_or_path", ddpm_teacher,
                 "--num_scales", 10, "--validation_steps", 6, "--report_to", "tensorboard",
                 *LOSS_FLAGS) == steps  # fmt: skip
    # validation grids every 6 steps, as PNG files and in TensorBoard (offline)
    grids = sorted(path.name for path in (out / "samples").glob("*.png"))
    assert grids == [f"step_00000{k:02d}_{n}step.png" for k in (6, 12) for n in (1, 2)]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    teacher = load_teacher(str(ddpm_teacher))
    pipe = assert_pipeline_samples(out, {"timesteps": [5, 0]})
    config = pipe.scheduler.config
    assert config.num_train_timesteps == 10
    assert "_name_or_path" not in json.loads((out / "unet" / "config.json").read_text())  # no local teacher path
    # the student's noise range lies inside the teacher's (a DDPM model knows nothing outside its timesteps)
    assert config.sigma_min == pytest.approx(max(0.002, teacher.sigma_min))
    assert config.sigma_max == pytest.approx(min(80.0, teacher.sigma_max))
    assert all(entry["num_scales"] == 10 for entry in steps_of(read_log(out)))

    images, levels = load_images(data_dir), Levels(10, 0.0)
    initial = make_tiny_unet(seed=1)  # the student starts from the teacher's UNet (same architecture)
    before = eval_loss("cd", initial, images, levels, config.sigma_min, config.sigma_max, teacher=teacher)
    after = eval_loss("cd", pipe.unet, images, levels, config.sigma_min, config.sigma_max, teacher=teacher)
    assert after < 0.97 * before
    assert_card(out, "cd", "num_scales", "heun")


@pytest.mark.slow
def test_denoiser_warmup_precedes_cd_and_moves_the_student_onto_the_teacher(data_dir, ddpm_teacher, tmp_path):
    """--denoiser_warmup_steps W: W steps of regression onto the teacher's D, then CD; the student gets closer to D."""
    from cm_diffusers.teachers import load_teacher

    out, steps, warmup = tmp_path / "warm", 12, 11
    assert train(*common_flags(data_dir, out, steps), "--mode", "cd", "--teacher_model_name_or_path", ddpm_teacher,
                 "--num_scales", 10, "--denoiser_warmup_steps", warmup, *LOSS_FLAGS) == steps  # fmt: skip
    log = steps_of(read_log(out))
    assert [entry["denoiser_warmup"] for entry in log] == [1] * warmup + [0] * (steps - warmup)
    assert "sigma_next_mean" not in log[warmup - 1] and "sigma_next_mean" in log[warmup]  # the CD loss follows
    teacher = load_teacher(str(ddpm_teacher))
    config = assert_pipeline_samples(out, {"timesteps": [5, 0]}).scheduler.config
    regression = DenoiserLoss(teacher, sigma_min=config.sigma_min, sigma_max=config.sigma_max)

    def distance_to_teacher(unet):
        torch.manual_seed(11)
        with torch.no_grad():
            network = unet_forward(unet.eval())
            return np.mean([regression(network, None, load_images(data_dir), None)[0].item() for _ in range(4)])

    trained = UNet2DModel.from_pretrained(out / "unet")
    assert distance_to_teacher(trained) < 0.95 * distance_to_teacher(make_tiny_unet(seed=1))
    card = (out / "README.md").read_text()
    assert "denoiser_warmup_steps" in card and "teacher" in card


def test_denoiser_warmup_shifts_the_curriculum_and_is_checked(data_dir, unet_config, tmp_path):
    out, steps, warmup = tmp_path / "ct", 7, 3
    assert train(*common_flags(data_dir, out, steps), "--mode", "ct", "--unet_config", unet_config, "--s0", 2,
                 "--s1", 20, "--denoiser_warmup_steps", warmup, "--ema_decay", 0) == steps  # fmt: skip
    log = steps_of(read_log(out))
    curriculum = Curriculum("ct", steps - warmup, s0=2, s1=20)
    assert [entry["num_scales"] for entry in log[warmup:]] == [curriculum(k).num_scales for k in range(steps - warmup)]
    assert [entry["denoiser_warmup"] for entry in log] == [1] * warmup + [0] * (steps - warmup)
    with pytest.raises(SystemExit):  # no consistency steps left
        train_consistency.parse_args(["--mode", "ct", "--output_dir", "x", "--max_train_steps", "3",
                                      "--denoiser_warmup_steps", "3"])  # fmt: skip
    with pytest.raises(SystemExit):  # a teacher target without a teacher
        train_consistency.parse_args(["--mode", "ct", "--output_dir", "x", "--denoiser_warmup_target", "teacher",
                                      "--denoiser_warmup_steps", "1"])  # fmt: skip


@pytest.mark.slow
def test_ect_tunes_a_diffusion_model_and_samples_with_sigmas(data_dir, ddpm_teacher, tmp_path):
    out, steps = tmp_path / "ect", 12
    assert train(*common_flags(data_dir, out, steps), "--mode", "ect", "--teacher_model_name_or_path", ddpm_teacher,
                 "--ect_num_stages", 2, "--dropout", 0.0, *LOSS_FLAGS) == steps  # fmt: skip
    log = steps_of(read_log(out))
    assert [entry["stage"] for entry in log] == [0] * 6 + [1] * 6
    pipe = assert_pipeline_samples(out, {"num_inference_steps": 1})
    config = pipe.scheduler.config
    assert_pipeline_samples(out, {"sigmas": [config.sigma_max, 0.821]})  # continuous levels: explicit sigmas
    images = load_images(data_dir)
    before = eval_loss("ect", make_tiny_unet(seed=1), images, Levels(0, 0.0, 1), config.sigma_min, config.sigma_max)
    after = eval_loss("ect", pipe.unet, images, Levels(0, 0.0, 1), config.sigma_min, config.sigma_max)
    assert after < 0.97 * before
    assert_card(out, "ect", "num_stages", "sigmas")


def test_ect_pipeline_can_start_sampling_below_the_trained_sigma_max(data_dir, ddpm_teacher, tmp_path, capsys):
    """--sampling_sigma_max: the saved scheduler starts there (1 step and the recommended 2 steps), the card keeps
    the trained range; grid modes, a start outside (sigma_mid, sigma_max] and one above the teacher's are refused."""
    from accelerate import Accelerator

    from cm_diffusers import ConsistencyScheduler
    from cm_diffusers.training.consistency import build_curriculum, load_teacher_for, pipeline_scheduler

    out = tmp_path / "ect"
    assert train(*common_flags(data_dir, out, 2), "--mode", "ect", "--teacher_model_name_or_path", ddpm_teacher,
                 "--dropout", 0.0, "--sampling_sigma_max", 40, *LOSS_FLAGS) == 2  # fmt: skip
    pipe = assert_pipeline_samples(out, {"sigmas": [40.0, 0.821]})
    assert pipe.scheduler.config.sigma_max == 40.0 and pipe.scheduler.init_noise_sigma == 40.0
    one_step = [pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", **schedule).images
                for schedule in ({}, {"sigmas": [40.0]})]  # fmt: skip
    assert np.array_equal(one_step[0], one_step[1])
    with pytest.raises(ValueError, match="sigma_max=40.0"):  # the folder's range; the trained one is a config away
        pipe(batch_size=2, sigmas=[80.0])
    pipe.scheduler = ConsistencyScheduler.from_pretrained(out, subfolder="scheduler", sigma_max=80.0)
    from_80 = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(from_80).all() and not np.allclose(from_80, one_step[0])
    assert_card(out, "ect", "| sigma_max | 80 |", "| sampling_sigma_max | 40 |", "| `sigmas` | [40, 0.821] |",
                "sampled from sigma in [0.01000132982421665, 40.0] (trained up to 80.0)")

    flags = ["--output_dir", tmp_path / "x", "--teacher_model_name_or_path", ddpm_teacher]
    for mode, start in (("cd", 40), ("ect", 0.5), ("ect", 100)):
        with pytest.raises(SystemExit):
            train_consistency.parse_args([str(f) for f in [*flags, "--mode", mode, "--sampling_sigma_max", start]])
        assert "--sampling_sigma_max" in capsys.readouterr().err
    args = train_consistency.parse_args([str(f) for f in [*flags, "--mode", "ect", "--sampling_sigma_max", 40]])
    with pytest.raises(ValueError, match=r"pass a value in \(0.002, 30.0\]"):  # a teacher trained up to 30 only
        pipeline_scheduler(args, build_curriculum(args), 0.002, 30.0)
    short = tmp_path / "short_teacher"  # 200 DDPM steps: sigma up to ~2.5 only
    DDPMPipeline(unet=make_tiny_unet(seed=1), scheduler=DDPMScheduler(num_train_timesteps=200)).save_pretrained(short)
    args = train_consistency.parse_args([str(f) for f in [*flags[:2], "--teacher_model_name_or_path", short,
                                                          "--mode", "ect", "--sampling_sigma_max", 40]])  # fmt: skip
    _, sigma_min, sigma_max = load_teacher_for(args, Accelerator(cpu=True), torch.float32)
    with pytest.raises(ValueError, match="outside the noise range trained"):  # main() builds it before the data
        pipeline_scheduler(args, build_curriculum(args), sigma_min, sigma_max)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, unet_config, tmp_path):
    out = tmp_path / "nan"
    # lr 0 at step 1 (warm-up), 5e29 at step 2, which blows the weights up: checkpoint-1 is the last good one, and
    # the weights after step 2 are never saved (tests/test_reliability.py resumes from checkpoint-1)
    with pytest.raises(FloatingPointError, match="step 2.*checkpoint-1"):
        train(*common_flags(data_dir, out, 4), "--mode", "ict", "--unet_config", unet_config, "--learning_rate", 1e30,
              "--lr_warmup_steps", 2, "--max_grad_norm", 0, "--checkpointing_steps", 1, "--ema_decay", 0)  # fmt: skip
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (out / "model_index.json").exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(data_dir, unet_config, tmp_path):
    """6 steps straight == 3 steps + resume + 3 steps: weights, EMA, target, curriculum, data order, noise, dropout."""

    def flags(out):
        return common_flags(data_dir, out, 6) + [
            "--mode", "ct", "--unet_config", unet_config, "--s0", 2, "--s1", 20, "--dropout", 0.2, "--ema_decay", 0.9,
            "--gradient_accumulation_steps", 2, "--train_batch_size", 4, "--checkpointing_steps", 3,
            "--learning_rate", 1e-3, "--lr_warmup_steps", 4,
        ]  # fmt: skip

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*flags(straight))
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert train(*flags(resumed), "--resume_from_checkpoint", "latest") == 6

    straight_log, resumed_log = steps_of(read_log(straight)), steps_of(read_log(resumed))
    assert [entry["step"] for entry in resumed_log] == [4, 5, 6]
    assert len({entry["num_scales"] for entry in straight_log}) == 6  # N(k) moves every step
    for a, b in zip(straight_log[3:], resumed_log):
        assert (a["num_scales"], a["target_ema"], a["lr"]) == (b["num_scales"], b["target_ema"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    a, b = load_file(straight / "unet" / WEIGHTS), load_file(resumed / "unet" / WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model(data_dir, unet_config, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU: a real gloo group, not two independent trainings."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(REPO / "training" / "train_consistency.py")]  # fmt: skip
    flags = common_flags(data_dir, out, 6) + ["--mode", "ict", "--unet_config", unet_config, "--train_batch_size", 4,
                                              "--s0", 2, "--s1", 16, "--ema_decay", 0, "--log_every_rank"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command + [str(flag) for flag in flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = read_log(out, "train_log_rank0.jsonl"), read_log(out, "train_log_rank1.jsonl")
    steps0, steps1 = steps_of(rank0), steps_of(rank1)
    curriculum = Curriculum("ict", 6, s0=2, s1=16)
    expected = [curriculum(k).num_scales for k in range(6)]
    assert [entry["num_scales"] for entry in steps0] == [entry["num_scales"] for entry in steps1] == expected
    assert [entry["weights_sha256"] for entry in steps0] == [entry["weights_sha256"] for entry in steps1]
    assert len({entry["weights_sha256"] for entry in steps0}) == 6  # and the weights do change every step
    assert [entry["loss"] for entry in steps0] == [entry["loss"] for entry in steps1]  # the all-reduced loss
    assert any(a["local_loss"] != b["local_loss"] for a, b in zip(steps0, steps1))  # different data shards
    # only the main process wrote the pipeline, and it holds the synchronised weights
    assert [entry for entry in rank0 if entry.get("event")] == [{"event": "saved_pipeline", "rank": 0}]
    assert not [entry for entry in rank1 if entry.get("event")]
    pipe = assert_pipeline_samples(out, {"num_inference_steps": 1})
    assert weights_digest(pipe.unet) == steps0[-1]["weights_sha256"]


def test_push_to_hub_uploads_the_pipeline_without_checkpoints_or_logs(data_dir, unet_config, tmp_path, monkeypatch):
    from helpers_hub import FakeHub

    out = tmp_path / "push"
    with FakeHub() as hub:
        hub.configure(monkeypatch)
        train(*common_flags(data_dir, out, 2), "--mode", "ict", "--unet_config", unet_config,
              "--checkpointing_steps", 1, "--push_to_hub", "--hub_model_id", "someone/tiny-ict")  # fmt: skip
        files = hub.files("someone/tiny-ict")
    assert (out / "checkpoint-2").is_dir() and (out / "logs").is_dir()  # kept locally ...
    assert not [name for name in files if name.startswith(("checkpoint", "logs"))]  # ... but not uploaded
    assert {"model_index.json", "README.md", "unet/" + WEIGHTS, "scheduler/scheduler_config.json"} <= set(files)
    assert files["unet/" + WEIGHTS] == (out / "unet" / WEIGHTS).read_bytes()


def test_default_student_is_sized_for_the_data():
    config = default_unet_config(28, 1)  # Fashion-MNIST: grayscale stays one channel
    unet = UNet2DModel.from_config(config)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (1, 1, 28)
    assert 1.0e6 < sum(p.numel() for p in unet.parameters()) < 2.0e6  # the teacher's size: CD/ECT students match
    assert default_unet_config(64, 3, num_class_embeds=10)["num_class_embeds"] == 10
    with pytest.raises(ValueError, match="divisible by 4"):
        default_unet_config(30, 1)


def test_class_conditional_flag_is_never_silently_dropped(data_dir, unet_config, tmp_path):
    # The image folder has no labels, and --unet_config fixes an unconditional architecture: both must be errors.
    with pytest.raises(ValueError, match="needs a dataset with class labels"):
        train(*common_flags(data_dir, tmp_path / "a", 1), "--mode", "ct", "--unet_config", unet_config,
              "--class_conditional")  # fmt: skip


def test_a_consistency_model_can_be_trained_further(data_dir, ddpm_teacher, tmp_path):
    """--student_model_name_or_path: the student starts as that consistency model (architecture and weights), the
    run's card says so, and what cannot be continued is refused with the flag to use."""
    from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler
    from cm_diffusers.training.consistency import build_student

    previous = tmp_path / "previous"
    ConsistencyPipeline(unet=make_tiny_unet(seed=3), scheduler=ConsistencyScheduler()).save_pretrained(previous)
    flags = ["--mode", "cd", "--output_dir", tmp_path / "x", "--teacher_model_name_or_path", ddpm_teacher]
    args = train_consistency.parse_args([str(flag) for flag in [*flags, "--student_model_name_or_path", previous]])
    student = build_student(args, None, None, 16, 1)
    saved = load_file(previous / "unet" / WEIGHTS)
    assert student.state_dict().keys() == saved.keys()
    assert all(torch.equal(value, saved[name]) for name, value in student.state_dict().items())
    assert student.config.dropout == args.dropout and student.training

    out = tmp_path / "continued"
    assert train(*common_flags(data_dir, out, 2), "--mode", "cd", "--teacher_model_name_or_path", ddpm_teacher,
                 "--student_model_name_or_path", previous, "--num_scales", 4) == 2  # fmt: skip
    assert_card(out, "cd", f"student_initialised_from | {previous}")

    with pytest.raises(ValueError, match="--teacher_model_name_or_path"):  # a diffusion model is no student
        build_student(train_consistency.parse_args([str(f) for f in [*flags, "--student_model_name_or_path",
                                                                     ddpm_teacher]]), None, None, 16, 1)  # fmt: skip
    other = tmp_path / "other_sigma_data"
    scheduler = ConsistencyScheduler(sigma_data=0.25)
    ConsistencyPipeline(unet=make_tiny_unet(seed=3), scheduler=scheduler).save_pretrained(other)
    args = train_consistency.parse_args([str(flag) for flag in [*flags, "--student_model_name_or_path", other]])
    with pytest.raises(ValueError, match="pass --sigma_data 0.25"):
        build_student(args, None, None, 16, 1)
    with pytest.raises(SystemExit):  # the weights and architecture come from the consistency model
        train_consistency.parse_args([str(f) for f in [*flags, "--student_model_name_or_path", previous,
                                                       "--no_teacher_init"]])  # fmt: skip
