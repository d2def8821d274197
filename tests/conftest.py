import os
import sys

# Before torch starts its thread pools: idle OpenMP threads must not spin on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny models, which gain nothing from intra-op threads, and several processes may share 2 CPU cores:
# oversubscribed OpenMP threads slow such runs down by orders of magnitude (measured here: 212 s against 2.2 s).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the multi-process training tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def tiny_unet():
    from helpers import make_tiny_unet

    return make_tiny_unet()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A real image folder for the training scripts: 32 grayscale 16x16 PNGs of seeded soft blobs."""
    from helpers import write_blob_images

    return write_blob_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def unet_config(tmp_path_factory):
    """make_tiny_unet's architecture as a --unet_config file."""
    import json

    from helpers import TINY_UNET_CONFIG

    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(TINY_UNET_CONFIG))
    return path


requires_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST not installed (make data)"
)
