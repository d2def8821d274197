"""Training data through the `datasets` library: a Hub dataset, a local folder, an image folder or Fashion-MNIST.

`add_data_args(parser)` adds the data flags shared by the training scripts; `build_dataset(args)` returns a
`datasets.Dataset` whose items are {"pixel_values": float tensor C x H x W in [-1, 1], "class_labels": int} (the
label only when the data has one).

Fashion-MNIST is read from its IDX files (Debian's `dataset-fashion-mnist` installs them under
/usr/share/datasets/fashion-mnist) with `--dataset_name fashion_mnist`, so it works offline; `--dataset_split test`
reads the 10k test images. Unreadable or non-image files are reported by name and skipped with a warning
(`--on_bad_image skip`, the default) or stop the run with a ValueError (`--on_bad_image error`).
"""

import argparse
import io
import logging
import os
from typing import Optional

import datasets
import numpy as np
import torch
from PIL import Image

from cm_diffusers.argtypes import positive_int
from cm_diffusers.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    image_mode,
    read_fashion_mnist,
    read_fashion_mnist_labels,
    resize_center_crop,
)

logger = logging.getLogger(__name__)

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "zalando-datasets/fashion_mnist")
IMAGE_EXTENSIONS = {
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2", ".ico"
}  # fmt: skip
METADATA_FILES = {"metadata.csv", "metadata.jsonl", "metadata.parquet"}  # read by datasets' imagefolder builder
LABEL_COLUMNS = ("label", "labels", "class", "class_label")
FLIP_COLUMN = "_flip"


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the data flags: --dataset_name, --dataset_config_name, --dataset_split, --train_data_dir,
    --fashion_mnist_dir, --cache_dir, --image_column, --label_column, --caption_column, --caption_template,
    --resolution, --channels, --random_flip, --max_train_samples, --on_bad_image."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A dataset on the Hugging Face Hub, a local folder `datasets.load_dataset` understands, or "
        "`fashion_mnist` to read Fashion-MNIST from its IDX files in --fashion_mnist_dir (offline).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name, if any.")
    group.add_argument(
        "--dataset_split", type=str, default="train", help="Split to train on (`test` = Fashion-MNIST's t10k files)."
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images (class subfolders become labels), read with datasets' imagefolder builder.",
    )
    group.add_argument(
        "--fashion_mnist_dir",
        type=str,
        default=FASHION_MNIST_DIR,
        help="Folder with Fashion-MNIST's *-idx3-ubyte.gz / *-idx1-ubyte.gz files (--dataset_name fashion_mnist).",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where datasets and Hub downloads are cached.")
    group.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    group.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="The column holding integer class labels (default: `label`, `labels` or `class` when present; "
        "`none` ignores labels).",
    )
    group.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The column holding each image's text prompt (text-to-image training, e.g. --mode lcd: default "
        "`text`, as in an imagefolder's metadata.jsonl); rows with an empty caption are named and skipped.",
    )
    group.add_argument(
        "--caption_template",
        type=str,
        default=None,
        help="Make each image's prompt from its class name, e.g. 'a photo of a {}' (lower-cased names of the label "
        "column's ClassLabel, e.g. Fashion-MNIST's 'ankle boot'); instead of --caption_column.",
    )
    group.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="Images are resized (shorter side) and center-cropped to this size (default: the data's own size).",
    )
    group.add_argument(
        "--channels",
        type=int,
        default=None,
        choices=[1, 3],
        help="1 (grayscale) or 3 (RGB); default: as the data (grayscale stays 1 channel).",
    )
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Horizontal flips: each epoch shows every image once as is and once mirrored, in random order.",
    )
    group.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Train on at most this many images (for quick runs).",
    )
    group.add_argument(
        "--on_bad_image",
        type=str,
        default="skip",
        choices=["skip", "error"],
        help="What to do with corrupt or non-image files: skip them with a warning that names them, or stop.",
    )
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Sources


def load_fashion_mnist(
    directory: str = FASHION_MNIST_DIR, split: str = "train", max_samples: Optional[int] = None
) -> datasets.Dataset:
    """Fashion-MNIST from its gzipped IDX files as a `datasets.Dataset` with an `image` and a `label` column.

    `max_samples` keeps the first images only (the files are in random order), before the PNG encoding.
    """
    if split not in ("train", "test"):  # the library also reads "t10k"; the flag offers the datasets names
        raise ValueError(f"Fashion-MNIST has the splits `train` and `test`, got --dataset_split {split!r}.")
    images, labels = read_fashion_mnist(split, directory), read_fashion_mnist_labels(split, directory)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {directory} disagree: {len(images)} images, {len(labels)} labels.")
    images, labels = images[:max_samples], labels[:max_samples]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def load_source(args) -> datasets.Dataset:
    """The raw dataset named by the flags (images still PIL, no preprocessing)."""
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError(
            "Pass exactly one of --dataset_name (a Hub dataset, a local dataset folder, or `fashion_mnist`) and "
            "--train_data_dir (a folder of images)."
        )
    if args.dataset_name in FASHION_MNIST_NAMES:
        return load_fashion_mnist(args.fashion_mnist_dir, args.dataset_split, args.max_train_samples)
    if args.train_data_dir is not None:
        if not os.path.isdir(args.train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {args.train_data_dir} is not a folder.")
        path, kwargs = "imagefolder", {"data_dir": args.train_data_dir}
    else:
        path, kwargs = args.dataset_name, {"name": args.dataset_config_name}
    if args.train_data_dir is not None or os.path.isdir(path):
        # local files are not downloaded: datasets' "Downloading data" bar would be misleading, so it says what it does
        kwargs["download_config"] = datasets.DownloadConfig(download_desc="Indexing local files")
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
        saved = datasets.load_from_disk(path)  # a folder written by `save_to_disk`
        return saved[args.dataset_split] if isinstance(saved, datasets.DatasetDict) else saved
    try:
        return datasets.load_dataset(path, split=args.dataset_split, cache_dir=args.cache_dir, **kwargs)
    except Exception as err:  # datasets raises many types (offline, missing split, bad builder): one clear message
        source = args.train_data_dir or args.dataset_name
        raise ValueError(f"Could not load the dataset {source!r} (split {args.dataset_split!r}): {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Bad files


def find_bad_images(dataset: datasets.Dataset, image_column: str) -> list:
    """(row index, name, reason) for every row whose image cannot be decoded."""
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]
    bad = []
    for index, item in enumerate(raw):
        name = (item or {}).get("path") or f"row {index}"
        try:
            source = item["path"] if item.get("bytes") is None else io.BytesIO(item["bytes"])
            with Image.open(source) as image:
                image.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            bad.append((index, os.path.basename(name) if item and item.get("path") else name, str(err)))
    return bad


def find_non_image_files(folder: str) -> list:
    """Files under an image folder that datasets' imagefolder builder silently ignores (not images, not metadata)."""
    others = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS and name not in METADATA_FILES:
                others.append(os.path.relpath(os.path.join(root, name), folder))
    return others


def caption_text(caption) -> str:
    """A row's prompt: the text itself, or the first of several (lists of captions per image); "" when none."""
    if isinstance(caption, (list, tuple)):
        caption = next((c for c in caption if isinstance(c, str) and c.strip()), "")
    return caption.strip() if isinstance(caption, str) else ""


def find_bad_captions(dataset: datasets.Dataset, caption_column: str, image_column: str) -> list:
    """(row index, name, reason) for every row whose caption is empty or not text, named by its image file."""
    captions = dataset.with_format(None)[caption_column]
    bad = [index for index, caption in enumerate(captions) if not caption_text(caption)]
    if not bad:
        return []
    raw = dataset.cast_column(image_column, datasets.Image(decode=False)).select(bad)[image_column]
    names = [os.path.basename((item or {}).get("path") or "") or f"row {index}" for index, item in zip(bad, raw)]
    return [(index, name, "empty caption") for index, name in zip(bad, names)]


def _handle_bad_files(dataset, args):
    bad = find_bad_images(dataset, args.image_column)
    if getattr(args, "caption_column", None):
        bad += find_bad_captions(dataset, args.caption_column, args.image_column)
    others = find_non_image_files(args.train_data_dir) if args.train_data_dir else []
    if not bad and not others:
        return dataset
    described = [f"{name} ({reason})" for _, name, reason in bad] + [f"{name} (not an image file)" for name in others]
    listing = ", ".join(described[:10]) + (f" and {len(described) - 10} more" if len(described) > 10 else "")
    if any(reason == "empty caption" for _, _, reason in bad):
        what = "row(s) that are not readable images or lack a caption"
        where = "row(s) of the training data are not readable images or lack a caption"
    else:
        what, where = "file(s) that are not readable images", "file(s) in the training data are not readable images"
    if args.on_bad_image == "error":
        raise ValueError(
            f"{len(described)} {where}: {listing}. Remove or fix them, or pass --on_bad_image skip."
        )
    logger.warning(f"Skipping {len(described)} {what}: {listing}")
    bad_rows = {index for index, _, _ in bad}
    return dataset.select([i for i in range(len(dataset)) if i not in bad_rows])


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_image(image: Image.Image, resolution: int, mode: str) -> torch.Tensor:
    """PIL image -> C x H x W float tensor in [-1, 1]: convert, resize the shorter side, center-crop."""
    if image.mode != mode:
        image = image.convert(mode)
    image = resize_center_crop(image, resolution)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)) / 127.5 - 1.0
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


def _label_column(dataset: datasets.Dataset, label_column: Optional[str]) -> Optional[str]:
    if label_column is not None:
        if label_column.lower() == "none":
            return None
        if label_column not in dataset.column_names:
            raise ValueError(f"--label_column {label_column!r} is not a column; columns: {dataset.column_names}.")
        return label_column
    return next((name for name in LABEL_COLUMNS if name in dataset.column_names), None)


def num_classes(dataset: datasets.Dataset) -> Optional[int]:
    """Number of classes of a dataset from `build_dataset` (None when it has no labels)."""
    label_column = getattr(dataset, "_cm_label_column", None)
    if label_column is None:
        return None
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    # Read the raw column: the dataset's transform expects whole rows and would fail on a label-only batch.
    return int(max(dataset.with_format(None)[label_column])) + 1


def class_name_prompts(dataset: datasets.Dataset, label_column: Optional[str], template: Optional[str]):
    """The prompt of each class, `template` filled with its lower-cased name (None without a template)."""
    if template is None:
        return None
    if "{}" not in template:
        raise ValueError(f"--caption_template needs a '{{}}' where the class name goes, got {template!r}.")
    feature = dataset.features.get(label_column) if label_column else None
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError("--caption_template makes prompts from class names: the data needs a labelled column with "
                         "class names (a ClassLabel, e.g. --dataset_name fashion_mnist).")  # fmt: skip
    return [template.format(name.lower()) for name in feature.names]


def with_mirrored_copies(dataset: datasets.Dataset) -> datasets.Dataset:
    """Random horizontal flips as data: every image twice, as is and mirrored (a `_flip` column).

    A shuffled epoch then shows each image once each way, and which version a batch holds depends only on the
    sampler's (seed, epoch) order: resumed, multi-process and multi-worker runs flip exactly as an uninterrupted
    one, which a random draw inside the transform cannot promise (Accelerate prefetches the next batch before a
    checkpoint saves the RNG state).
    """
    dataset = dataset.flatten_indices() if dataset._indices is not None else dataset
    size = len(dataset)
    return datasets.concatenate_datasets(
        [dataset.add_column(FLIP_COLUMN, [False] * size), dataset.add_column(FLIP_COLUMN, [True] * size)]
    )


def build_dataset(args) -> datasets.Dataset:
    """The training set named by the data flags, yielding {"pixel_values", "class_labels" (if labelled)}."""
    dataset = load_source(args)
    if args.image_column not in dataset.column_names:
        raise ValueError(f"--image_column {args.image_column!r} is not a column; columns: {dataset.column_names}.")
    label_column = _label_column(dataset, args.label_column)
    caption_column = getattr(args, "caption_column", None)
    if caption_column is not None and caption_column not in dataset.column_names:
        raise ValueError(f"--caption_column {caption_column!r} is not a column; columns: {dataset.column_names}.")
    class_prompts = class_name_prompts(dataset, label_column, getattr(args, "caption_template", None))
    if args.max_train_samples is not None:
        if args.dataset_name not in FASHION_MNIST_NAMES:  # Fashion-MNIST is already in random order
            dataset = dataset.shuffle(seed=getattr(args, "seed", None) or 0)
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if args.dataset_name not in FASHION_MNIST_NAMES:  # the IDX reader made every image itself
        dataset = _handle_bad_files(dataset, args)
    if len(dataset) == 0:
        raise ValueError("The training data has no readable images.")

    first = dataset[0][args.image_column]
    channels = args.channels or (1 if image_mode(first) == "L" else 3)
    mode = "L" if channels == 1 else "RGB"
    resolution = args.resolution or min(first.size)
    if args.random_flip:
        dataset = with_mirrored_copies(dataset)

    def transform(batch):
        pixel_values = [preprocess_image(image, resolution, mode) for image in batch[args.image_column]]
        if args.random_flip:
            pixel_values = [p.flip(-1) if flip else p for p, flip in zip(pixel_values, batch[FLIP_COLUMN])]
        out = {"pixel_values": pixel_values}
        if label_column is not None:
            out["class_labels"] = [int(label) for label in batch[label_column]]
        if caption_column is not None:
            out["captions"] = [caption_text(caption) for caption in batch[caption_column]]
        elif class_prompts is not None:
            out["captions"] = [class_prompts[int(label)] for label in batch[label_column]]
        return out

    dataset = dataset.with_transform(transform)
    dataset._cm_label_column = label_column
    logger.info(
        f"Training data: {len(dataset)} images, {channels} channel(s), {resolution}x{resolution}, "
        f"labels: {label_column or 'none'}"
    )
    return dataset
