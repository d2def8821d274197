import argparse
import logging

import numpy as np
import pytest
import torch
from conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from PIL import Image

from training.data import add_data_args, build_dataset, load_fashion_mnist, num_classes


def parse(*argv):
    return add_data_args(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture
def image_folder(tmp_path):
    """Two class folders of real PNGs (grayscale, 20x24), one corrupt PNG and one text file."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_skips_bad_files_by_name(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = build_dataset(parse("--train_data_dir", str(image_folder), "--resolution", "16"))
    assert len(dataset) == 6
    assert "Skipping 2 file(s)" in caplog.text
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text
    item = dataset[0]
    assert item["pixel_values"].shape == (1, 16, 16)  # grayscale stays one channel
    assert item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert sorted(dataset[i]["class_labels"] for i in range(len(dataset))) == [0, 0, 0, 1, 1, 1]
    assert num_classes(dataset) == 2


def test_image_folder_error_names_the_files(image_folder):
    with pytest.raises(ValueError, match=r"broken\.png.*notes\.txt|notes\.txt.*broken\.png"):
        build_dataset(parse("--train_data_dir", str(image_folder), "--on_bad_image", "error"))


def test_channels_resolution_and_flip(image_folder):
    args = parse("--train_data_dir", str(image_folder), "--channels", "3", "--label_column", "none")
    dataset = build_dataset(args)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 20, 20)  # default resolution: the shorter side, center-cropped
    assert "class_labels" not in item
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][1])  # gray -> RGB repeats the channel

    plain = build_dataset(parse("--train_data_dir", str(image_folder), "--resolution", "16"))
    flipped = build_dataset(parse("--train_data_dir", str(image_folder), "--resolution", "16", "--random_flip"))
    size = len(plain)
    assert len(flipped) == 2 * size  # each image as is and mirrored: the shuffled sampler picks which one when
    for i in range(size):
        image, label = plain[i]["pixel_values"], plain[i]["class_labels"]
        assert torch.equal(flipped[i]["pixel_values"], image) and flipped[i]["class_labels"] == label
        assert torch.equal(flipped[size + i]["pixel_values"], image.flip(-1))
        assert flipped[size + i]["class_labels"] == label
    assert not torch.equal(image, image.flip(-1))


def test_exactly_one_source_required():
    with pytest.raises(ValueError, match="exactly one of --dataset_name"):
        build_dataset(parse())


def test_missing_fashion_mnist_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fashion_mnist_dir"):
        build_dataset(parse("--dataset_name", "fashion_mnist", "--fashion_mnist_dir", str(tmp_path)))


@requires_fashion_mnist
def test_fashion_mnist_from_idx_files():
    import gzip

    test_split = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert len(test_split) == 10_000
    assert test_split.features["label"].names[9] == "Ankle boot"
    with gzip.open(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz") as f:
        first_pixels = np.frombuffer(f.read(16 + 784), dtype=np.uint8, offset=16).reshape(28, 28)
    assert np.array_equal(np.array(test_split[0]["image"]), first_pixels)
    assert test_split[0]["label"] == 9  # the first test image is an ankle boot

    dataset = build_dataset(parse("--dataset_name", "fashion_mnist", "--max_train_samples", "300"))
    assert len(dataset) == 300
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 28, 28)
    assert batch["class_labels"].dtype == torch.int64
    assert batch["pixel_values"].min() == -1.0  # Fashion-MNIST has black backgrounds
    assert num_classes(dataset) == 10


def test_saved_dataset_with_integer_labels(tmp_path):
    # A plain int label column (not a ClassLabel) from a `save_to_disk` folder: the class count is read from the
    # raw column, not through the image transform.
    import datasets

    images = [Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)) for i in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 3, 1, 2]}).save_to_disk(str(tmp_path / "ds"))
    dataset = build_dataset(parse("--dataset_name", str(tmp_path / "ds"), "--resolution", "8"))
    assert num_classes(dataset) == 4
    item = dataset[1]
    assert item["pixel_values"].shape == (1, 8, 8) and int(item["class_labels"]) == 3
