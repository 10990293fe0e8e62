"""Shared test data: a tiny MNIST in the official IDX format, written by the tests.

The images are digits 0-9 drawn with Pillow's built-in font at random sizes, positions,
rotations and stroke widths, so a classifier can learn them (evaluate.py's tests need
that) while the files look to torchvision.datasets.MNIST exactly like the real ones.
"""
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are plain files at the top of the repository


def write_idx(path, array):
    """Write a uint8 array as an IDX file (http://yann.lecun.com/exdb/mnist/ format)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)  # 0x08: unsigned byte
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    Path(path).write_bytes(header + array.tobytes())


def make_digits(n, seed):
    """n synthetic 28x28 uint8 digit images and their labels 0-9."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    fonts = {s: ImageFont.load_default(size=s) for s in (18, 20, 22)}
    for i, label in enumerate(labels):
        canvas = Image.new("L", (28, 28))
        draw = ImageDraw.Draw(canvas)
        font = fonts[int(rng.choice([18, 20, 22]))]
        x, y = rng.integers(5, 10), rng.integers(0, 4)
        draw.text((x, y), str(label), fill=255, font=font, stroke_width=int(rng.integers(0, 2)),
                  stroke_fill=255)
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        images[i] = np.asarray(canvas)
    return images, labels


def write_mnist(root, n_train=512, n_test=256, seed=0, folder="MNIST"):
    """Write a tiny MNIST (or Fashion-MNIST with folder='FashionMNIST') under root."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = make_digits(n, s)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


@pytest.fixture(autouse=True)
def work_in_a_temporary_folder(tmp_path, monkeypatch):
    """Each test runs in its own folder: a script's default --out-dir (runs/<script>) and its lock
    land there, never in the checkout, where a user's own run may hold them."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data dir holding a tiny MNIST: 512 training and 256 test images."""
    return write_mnist(tmp_path_factory.mktemp("data"))
