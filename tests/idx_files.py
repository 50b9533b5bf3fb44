"""Small, valid MNIST-format IDX files for tests that must not need the real set."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from distnum.data import FILES, IMAGE_MAGIC, LABEL_MAGIC


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) < 0.2) * rng.integers(1, 256, (n, 28, 28))
    return images.astype(np.uint8), (np.arange(n) % 10).astype(np.uint8)


def write_fake_mnist(
    directory: Path,
    n_train: int = 60,
    n_test: int = 20,
    compress: bool = True,
    names: dict[str, str] = FILES,
) -> dict[str, bytes]:
    """Write the four files into directory, named as in `names` (FILES: the standard names,
    .gz added when compressed); returns file name -> the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = fake_split(n, seed)
        for kind, array, magic in (
            ("images", images, IMAGE_MAGIC),
            ("labels", labels, LABEL_MAGIC),
        ):
            name = names[f"{split}_{kind}"]
            data = idx_bytes(array, magic)
            if compress:
                name, data = name + ".gz", gzip.compress(data, mtime=0)
            (directory / name).write_bytes(data)
            written[name] = data
    return written
