"""benchmarks/gpu_check.py: its --quick run on this machine, a failing and a hanging part that stop only themselves,
and the full run's plan, every command of which must parse with the argument parser of the script it runs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
STATUSES = {"ok", "failed", "skipped"}


def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_script("gpu_check", SCRIPT)


def run_check(output, *flags, timeout=900):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--output", str(output), *flags], capture_output=True,
                            text=True, env=env, timeout=timeout)
    report_path = output / "gpu_check.json"
    assert report_path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    with open(report_path) as f:
        report = json.load(f)
    return result, report, {part["name"]: part for part in report["parts"]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_check")
    return (output, *run_check(output))


@pytest.mark.slow
def test_quick_run_gives_every_part_a_status_and_runs_what_the_cpu_can(quick_run):
    output, result, report, parts = quick_run
    assert list(parts) == gpu_check.PART_NAMES
    for part in parts.values():
        assert part["status"] in STATUSES
        assert part["status"] != "skipped" or part["reason"]
        assert part["status"] != "failed" or part["error"]
    if torch.cuda.is_available():
        pytest.skip("the CPU expectations below are for a machine without CUDA")
    assert result.returncode == 0, result.stdout[-3000:]
    # the parts that need CUDA say so; the CPU-capable ones ran and measured something
    assert parts["cuda_tests"]["status"] == "skipped" and "CUDA" in parts["cuda_tests"]["reason"]
    assert parts["serve"]["status"] == "skipped" and "CUDA" in parts["serve"]["reason"]
    for name in ("sampling_speed", "train_throughput", "teacher", "cd", "ect", "fid"):
        assert parts[name]["status"] == "ok", parts[name]
    assert all(row["ours_over_floor"] > 0 for row in parts["sampling_speed"]["details"]["rows"])
    throughput = parts["train_throughput"]["details"]["rows"]
    assert sorted(row["mode"] for row in throughput) == sorted(gpu_check.THROUGHPUT_MODES)
    assert all(row["images_per_second"] > 0 and row["peak_rss_mib"] > 0 for row in throughput)
    for name in ("teacher", "cd", "ect"):
        details = parts[name]["details"]
        assert details["steps"] > 0 and details["final_loss"] > 0 and os.path.isdir(details["pipeline"])
    fids = parts["fid"]["details"]["rows"]
    assert {row["sampler"] for row in fids} == {"consistency", "heun"} and len(fids) == 3
    assert all(row["fid"] > 0 for row in fids)

    markdown = (output / "gpu_check.md").read_text()
    for name in gpu_check.PART_NAMES:
        assert f"| {name} |" in markdown
    assert report["model_archives"] == [str(output / "work" / f"{f}.tar") for f in gpu_check.MODEL_FOLDERS.values()]
    for folder in gpu_check.MODEL_FOLDERS.values():  # one archive per model, without checkpoints
        with tarfile.open(output / "work" / f"{folder}.tar") as tar:
            names = set(tar.getnames())
        assert f"{folder}/model_index.json" in names and f"{folder}/unet/config.json" in names
        assert not any("checkpoint" in name or "/logs" in name for name in names)


@pytest.mark.slow
def test_a_failing_and_a_hanging_part_stop_only_themselves(tmp_path):
    result, report, parts = run_check(tmp_path, "--parts", "cuda_tests,sampling_speed,teacher,cd", "--inject",
                                      "cuda_tests=error", "--inject", "teacher=hang", "--time_limit", "teacher=3")
    assert result.returncode == 1  # some part failed
    assert parts["cuda_tests"]["status"] == "failed" and "injected failure" in parts["cuda_tests"]["error"]
    assert parts["sampling_speed"]["status"] == "ok"
    assert parts["teacher"]["status"] == "failed" and "timed out after 3 s" in parts["teacher"]["error"]
    assert parts["teacher"]["seconds"] < 20  # the hanging process group was killed at the limit
    assert parts["cd"]["status"] == "skipped" and "no teacher pipeline" in parts["cd"]["reason"]
    assert "| cuda_tests | failed |" in (tmp_path / "gpu_check.md").read_text()


def parse_recipe(command, tmp_path):
    """Runs a training recipe with a stand-in `accelerate` on PATH that records its arguments instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "accelerate"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stand_in.chmod(0o755)
    env = {**os.environ, **command.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def test_every_command_of_the_full_plan_parses_with_its_scripts_own_parser(tmp_path, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    from cm_diffusers.cli import build_parser
    from cm_diffusers.commands.evaluate import parse_sigma_schedules
    from cm_diffusers.shipped_models import resolve_pretrained

    monkeypatch.syspath_prepend(REPO)
    args = gpu_check.parse_args(["--plan", "--output", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work")])
    ctx = gpu_check.make_context(args, cuda=True)
    assert not ctx.quick and ctx.device == "cuda"
    # the students' parser checks that their teacher is a model folder: put one where the plan's teacher will be
    shutil.copytree(resolve_pretrained("fashion-mnist-edm"), ctx.model("teacher"))
    plan = gpu_check.time_plan(args, ctx)
    assert [part.name for part, _ in plan] == gpu_check.PART_NAMES
    assert sum(limit for _, limit in plan) <= 600  # one 10-minute command on a GPU machine

    scripts = {name: load_script(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
               for name in ("sampling_speed", "train_throughput", "serve_load")}
    parsed = []
    for part, _ in plan:
        commands = part.commands(ctx)
        assert commands, part.name
        for command in commands:
            argv = [str(a) for a in command.argv]
            if argv[0] == "bash":  # a training recipe: accelerate launch's flags, then the training script's
                recorded = parse_recipe(command, tmp_path)
                assert recorded[0] == "launch"
                launch = launch_command_parser().parse_args(recorded[1:])
                assert launch.mixed_precision == "bf16" and launch.num_processes == 1
                script = load_script("train_script", os.path.join(REPO, launch.training_script))
                script_args = script.parse_args(launch.training_script_args)
                assert script_args.mixed_precision == "bf16" and script_args.output_dir == ctx.model(part.name)
                assert script_args.dataset_name == "fashion_mnist" and script_args.resolution == 28
                parsed.append(part.name)
            elif argv[1:3] == ["-m", "pytest"]:
                assert "cuda" in argv and argv[argv.index("-m", 2) + 1] == "cuda"
                parsed.append(part.name)
            elif argv[1:4] == ["-m", "cm_diffusers.cli", "evaluate"]:
                evaluate = build_parser().parse_args(argv[3:])
                parse_sigma_schedules(evaluate.sigmas)  # checked after parsing, before any model loads
                assert evaluate.num_samples == 2000 and evaluate.reference_num_samples == 10000
                parsed.append(part.name)
            else:
                name = os.path.splitext(os.path.basename(argv[1]))[0]
                if name == "serve_load":  # its parse_args reads sys.argv
                    monkeypatch.setattr(sys, "argv", argv[1:])
                    scripts[name].parse_args()
                else:
                    scripts[name].parse_args(argv[2:])
                parsed.append(part.name)
    assert set(parsed) == set(gpu_check.PART_NAMES)
    assert parsed.count("train_throughput") == len(gpu_check.THROUGHPUT_RUNS)


def test_an_optional_command_cut_at_the_time_limit_leaves_the_part_ok(tmp_path):
    from types import SimpleNamespace

    runner = load_script("gpu_check_runner", os.path.join(REPO, "benchmarks", "gpu_check_runner.py"))
    (tmp_path / "logs").mkdir()
    ctx = SimpleNamespace(cuda=False, quick=True, out=lambda *names: str(tmp_path.joinpath(*names)))
    result = tmp_path / "measured.json"
    commands = [runner.Command("measure", [sys.executable, "-c", f"open({str(result)!r}, 'w').write('[1]')"]),
                runner.Command("more", [sys.executable, "-c", "import time; time.sleep(60)"], optional=True)]
    part = runner.Part("demo", "a measurement, then an optional one that outlasts the limit", 3, 3,
                       commands=lambda ctx: commands, summarize=lambda ctx: {"rows": json.loads(result.read_text())},
                       line=lambda details: f"{len(details['rows'])} row")
    record = runner.run_part(part, ctx, limit_s=3, inject=None, base_env=dict(os.environ))
    assert record["status"] == "ok" and record["summary"] == "1 row", record
    assert [c["name"] for c in record["commands"]] == ["measure"]
    assert record["not_run"] and "cut at the part's time limit" in record["not_run"][0]
    assert record["seconds"] < 15
