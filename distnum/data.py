"""MNIST and Fashion-MNIST: find, download, check and read the four IDX files.

Where the files come from, first match wins:
1. the `data_dir` argument (`--data-dir`), else the DISTNUM_DATA environment variable:
   a directory named this way must hold the files;
2. the per-user cache, $XDG_CACHE_HOME/distnum/<dataset> (~/.cache/distnum/<dataset>),
   and for Fashion-MNIST also /usr/share/datasets/fashion-mnist (Debian's package);
3. a download from the public mirrors into the cache, each file checked against the MD5 of
   the original and renamed into place only when whole and right.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 30


class DataError(Exception):
    """A data set that is missing, damaged or cannot be fetched; the message says the fix."""


@dataclass(frozen=True)
class Dataset:
    name: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # file name -> MD5 of the original .gz
    system_dirs: tuple[str, ...] = ()


FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATASETS = {
    "mnist": Dataset(
        "mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": Dataset(
        "fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def dataset_info(dataset: str) -> Dataset:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache directory of a data set (it may not exist yet)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "distnum" / dataset


def find_file(directory: Path, stem: str) -> Path | None:
    """The .gz or uncompressed IDX file `stem` in directory, if either is there."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def has_all_files(directory: Path) -> bool:
    return all(find_file(directory, stem) for stem in FILES.values())


def locate(dataset: str = "mnist", data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read a data set from, downloading it into the cache if need be."""
    info = dataset_info(dataset)
    named = data_dir if data_dir is not None else os.environ.get("DISTNUM_DATA") or None
    if named is not None:
        directory = Path(named).expanduser()
        how = "--data-dir" if data_dir is not None else "DISTNUM_DATA"
        if not directory.is_dir():
            raise DataError(
                f"{how} {directory} is not a directory; point it at the folder "
                f"holding the four {info.name} IDX files"
            )
        if not has_all_files(directory):
            missing = [s for s in FILES.values() if not find_file(directory, s)]
            raise DataError(
                f"{how} {directory} has no {', '.join(missing)} (.gz or "
                f"uncompressed); put the four {info.name} IDX files there"
            )
        return directory
    cache = cache_dir(info.name)
    for directory in (cache, *map(Path, info.system_dirs)):
        if has_all_files(directory):
            return directory
    try:
        download(info, cache)
    except DataError as failure:
        searched = ", ".join(str(p) for p in (cache, *info.system_dirs))
        raise DataError(
            f"{info.name} not found (looked in DISTNUM_DATA (unset), {searched}) and the "
            f"download failed: {failure}. Offline, copy the four IDX files into a folder and "
            f"pass --data-dir DIR or set DISTNUM_DATA=DIR"
        ) from None
    return cache


def download(info: Dataset, dest: Path, mirrors: tuple[str, ...] | None = None) -> None:
    """Fetch each .gz file of `info` that dest lacks, trying the mirrors in turn."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in info.md5.items():
        if (dest / name).is_file():
            continue
        failures = []
        for mirror in mirrors or info.mirrors:
            try:
                fetch(mirror.rstrip("/") + "/" + name, dest / name, md5)
                break
            except DataError as failure:
                failures.append(str(failure))
        else:
            raise DataError("; ".join(failures))


def fetch(url: str, path: Path, md5: str) -> None:
    """Download url to path atomically: to a temporary file beside it, checked, then renamed.
    On any failure the temporary file is removed and nothing is left at path."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length else None
                    with tqdm(
                        total=total, unit="B", unit_scale=True, desc=path.name, leave=False
                    ) as bar:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                    received = bar.n
            except urllib.error.HTTPError as error:
                raise DataError(f"{url}: HTTP {error.code} {error.reason}") from None
            except (http.client.IncompleteRead, ConnectionError) as error:
                raise DataError(f"{url}: truncated transfer ({error})") from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                raise DataError(f"{url}: cannot connect ({reason})") from None
            if total is not None and received != total:
                raise DataError(f"{url}: truncated transfer ({received} of {total} bytes)")
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: wrong checksum (MD5 {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file (gzip or not), checked: magic number, dimensions and
    length. Anything wrong raises DataError naming the file, the fault and the fix."""
    fix = f"replace {path} with an intact copy (if it is in the cache, delete it to download again)"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file; {fix}") from None
    except (EOFError, zlib.error):
        raise DataError(f"{path}: truncated or corrupt gzip data; {fix}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror}); {fix}") from None
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated ({len(raw)} bytes, shorter than the IDX header); {fix}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: wrong magic number {found} (expected {magic}: "
            f"{'images' if magic == IMAGE_MAGIC else 'labels'}); {fix}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{path}: images of {dims[1]}x{dims[2]} pixels, expected 28x28; {fix}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what} ({len(raw)} bytes, header says {expected}); {fix}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and data.size and data.max() >= NUM_CLASSES:
        raise DataError(f"{path}: label {data.max()} outside 0-9; {fix}")
    return data


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, 28, 28) and labels (N,) of split 'train' or 'test'."""
    image_path = find_file(directory, FILES[f"{split}_images"])
    label_path = find_file(directory, FILES[f"{split}_labels"])
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds "
            f"{len(labels)} labels; replace them with a matching pair"
        )
    return images, labels


def load_mnist(
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, t_train), (x_test, t_test)) as in the book.

    Images are float64, (N, 784) when flatten else (N, 1, 28, 28), in [0, 1] when normalize
    else in [0, 255]. Labels are class indices (N,), or one-hot float64 (N, 10)."""
    directory = locate(dataset, data_dir)
    splits = []
    for split in ("train", "test"):
        images, labels = read_split(directory, split)
        x = images.astype(np.float64)
        if normalize:
            x /= 255.0
        x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, IMAGE_SIDE, IMAGE_SIDE)
        t = np.eye(NUM_CLASSES)[labels] if one_hot_label else labels.astype(np.int64)
        splits.append((x, t))
    return splits[0], splits[1]
