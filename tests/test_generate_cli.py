"""`cm-diffusers generate` end to end on a saved tiny pipeline."""

import numpy as np
import pytest
from helpers import make_tiny_unet
from PIL import Image

from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler
from cm_diffusers.cli import main
from cm_diffusers.images import image_grid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cm")
    ConsistencyPipeline(make_tiny_unet(), ConsistencyScheduler()).save_pretrained(folder)
    return str(folder)


def test_generate_writes_grid_and_images_and_repeats_with_seed(model_dir, tmp_path):
    args = ["generate", "--model", model_dir, "--num_images", "5", "--batch_size", "2", "--timesteps", "22,0",
            "--seed", "3"]
    assert main(args + ["--output", str(tmp_path / "a.png"), "--save_images_dir", str(tmp_path / "single")]) == 0
    assert main(args + ["--output", str(tmp_path / "b.png")]) == 0
    grid_a, grid_b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert grid_a.mode == "L" and grid_a.size == (3 * 18 + 2, 2 * 18 + 2)
    np.testing.assert_array_equal(np.asarray(grid_a), np.asarray(grid_b))
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [f"{i:05d}.png" for i in range(5)]


def test_generate_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--steps", "2", "--ts", "0,1,39"]) == 1
    assert "at most one" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--timesteps", "0,22", "--output", str(tmp_path / "x.png")]) == 1
    assert "descending" in capsys.readouterr().err


def test_image_grid_layout():
    images = np.zeros((3, 4, 5, 3), dtype=np.float32)
    images[1] = 1.0
    grid = np.asarray(image_grid(images, nrow=3, padding=1))
    assert grid.shape == (6, 19, 3)
    assert grid[1:5, 7:12].min() == 255 and grid[1:5, 1:6].max() == 0


def test_openai_ts_flag_equals_diffusers_timesteps(model_dir, tmp_path):
    common = ["generate", "--model", model_dir, "--num_images", "2", "--seed", "1"]
    assert main(common + ["--ts", "0,22,39", "--output", str(tmp_path / "ts.png")]) == 0
    assert main(common + ["--timesteps", "22,0", "--output", str(tmp_path / "t.png")]) == 0
    same = np.asarray(Image.open(tmp_path / "ts.png")), np.asarray(Image.open(tmp_path / "t.png"))
    np.testing.assert_array_equal(*same)
    assert main(common + ["--ts", "22,0,39", "--output", str(tmp_path / "bad.png")]) == 1
