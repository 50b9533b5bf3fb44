"""MNIST and Fashion-MNIST: find, download, check and read the four IDX files.

Where the files come from, first match wins:
1. the `data_dir` argument (`--data-dir`), else the DISTNUM_DATA environment variable:
   a directory named this way must hold the files, under the standard names (gzip-compressed
   or not) or the dotted ones some mirrors use (train-images.idx3-ubyte);
2. the per-user cache, $XDG_CACHE_HOME/distnum/<dataset> (~/.cache/distnum/<dataset>),
   and for Fashion-MNIST also /usr/share/datasets/fashion-mnist (Debian's package);
3. a download from the public mirrors into the cache, each file checked against the MD5 of
   the original and renamed into place only when whole and right.

Every file read is checked whole (gzip CRC, IDX header, length, label range), so a damaged
file, in the cache or not, is refused with a one-line DataError and never used.
"""

from __future__ import annotations

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

from distnum.folders import make_folder, remove_empty
from distnum.options import option

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 30
GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A data set that is missing, damaged or cannot be fetched; the message says the fix."""


class BadFile(Exception):
    """What is wrong with one IDX file; read_idx turns it into a DataError naming the file."""


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
    except (KeyError, TypeError):  # TypeError: an unhashable dataset=
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache directory of a data set (it may not exist yet)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "distnum" / dataset


def file_names(stem: str) -> tuple[str, ...]:
    """The names IDX file `stem` may have, preferred first: the standard one, then the dotted
    one some mirrors and archives use (train-images.idx3-ubyte), each .gz or uncompressed."""
    dotted = stem.replace("-idx", ".idx")
    return tuple(name + suffix for name in (stem, dotted) for suffix in (".gz", ""))


def find_file(directory: Path, stem: str) -> Path | None:
    """The IDX file `stem` in directory under any of its names, if it is there."""
    for name in file_names(stem):
        if (directory / name).is_file():
            return directory / name
    return None


def has_all_files(directory: Path) -> bool:
    return all(find_file(directory, stem) for stem in FILES.values())


def named_dir(data_dir: object) -> tuple[Path, str] | None:
    """The folder named by the data_dir argument, else by DISTNUM_DATA, and how it was named
    for messages (`data_dir='DIR'`, `--data-dir DIR` or `DISTNUM_DATA=DIR`); None if neither
    names one."""
    if data_dir is None:
        named = os.environ.get("DISTNUM_DATA")
        if not named:
            return None
        directory = Path(named).expanduser()
        return directory, f"DISTNUM_DATA={directory}"
    if not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir):
        raise DataError(
            f"{option('data_dir', data_dir)} is not a folder: give a str or pathlib.Path "
            f"naming the folder with the IDX files, or None to use DISTNUM_DATA or the cache"
        )
    directory = Path(data_dir).expanduser()
    return directory, option("data_dir", str(directory))


def locate(dataset: str = "mnist", data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read a data set from, downloading it into the cache if need be."""
    info = dataset_info(dataset)
    named = named_dir(data_dir)
    if named is not None:
        directory, how = named
        if not directory.is_dir():
            raise DataError(
                f"{how} is not a directory; point it at the folder "
                f"holding the four {info.name} IDX files"
            )
        if not has_all_files(directory):
            missing = [s for s in FILES.values() if not find_file(directory, s)]
            raise DataError(
                f"{how} has no {', '.join(missing)} (each .gz or not, or dotted as in "
                f"train-images.idx3-ubyte); put the four {info.name} IDX files there"
            )
        return directory
    cache = cache_dir(info.name)
    for directory in (cache, *map(Path, info.system_dirs)):
        if has_all_files(directory):
            return directory
    searched = ", ".join(str(p) for p in (cache, *info.system_dirs))
    not_found = f"{info.name} not found (looked in DISTNUM_DATA (unset), {searched})"
    use_own = (
        "copy the four IDX files into a folder DIR and set DISTNUM_DATA=DIR "
        f"(or give {option('data_dir', 'DIR')})"
    )
    made = []
    try:  # before any download: a cache folder that cannot be made or written to
        made = make_folder(cache)
        tempfile.TemporaryFile(dir=cache).close()
    except OSError as error:
        remove_empty(made)
        raise DataError(
            f"{not_found} and the cache folder {cache} cannot be written to download it into "
            f"({error.strerror}): {use_own}, or set XDG_CACHE_HOME to a writable folder"
        ) from None
    try:
        download(info, cache)
    except DataError as failure:
        remove_empty(made)  # the files already fetched stay, for the next try
        raise DataError(
            f"{not_found} and the download failed: {failure}. Offline, {use_own}"
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
            except TimeoutError:
                raise DataError(
                    f"{url}: the transfer stalled (no data for {DOWNLOAD_TIMEOUT_S} s)"
                ) from None
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


def gunzip(raw: bytes) -> bytes:
    """The content of gzip data (one member or several, each CRC-checked); BadFile says what
    is wrong: not gzip, truncated, corrupt, or bytes after the gzip stream."""
    if not raw.startswith(GZIP_MAGIC):
        looks_raw = int.from_bytes(raw[:4], "big") in (IMAGE_MAGIC, LABEL_MAGIC)
        raise BadFile(
            "not a gzip file but an uncompressed IDX file: remove .gz from its name"
            if looks_raw
            else "not a gzip file"
        )
    parts, rest = [], raw
    while rest.startswith(GZIP_MAGIC):
        member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            parts.append(member.decompress(rest))
        except zlib.error as error:
            raise BadFile(f"corrupt gzip data ({str(error).rpartition(': ')[2]})") from None
        if not member.eof:
            raise BadFile(f"truncated gzip data (the {len(raw)} bytes end mid-stream)")
        rest = member.unused_data
    if rest:
        raise BadFile(
            f"has {len(rest)} bytes of trailing data after the gzip stream "
            f"(which ends at byte {len(raw) - len(rest)})"
        )
    return b"".join(parts)


def parse_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in IDX file path (gzip or not), checked: readable, magic number,
    28x28 images, at least one item, exact length, labels 0-9. BadFile says what is wrong."""
    kind = {IMAGE_MAGIC: "images", LABEL_MAGIC: "labels"}
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BadFile(f"cannot read ({error.strerror})") from None
    if not raw:
        raise BadFile("empty (0 bytes)")
    if path.suffix == ".gz":
        raw = gunzip(raw)
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BadFile(f"truncated ({len(raw)} bytes, shorter than the IDX header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise BadFile(
            f"holds {kind[found]}, not {kind[magic]} (magic number {found})"
            if found in kind
            else f"wrong magic number {found} (expected {magic}: {kind[magic]}), not MNIST IDX"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise BadFile(f"images of {dims[1]}x{dims[2]} pixels, expected 28x28")
    if dims[0] == 0:
        raise BadFile(f"holds 0 {kind[magic]}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise BadFile(f"{what} ({len(raw)} bytes, header says {expected})")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and data.max() >= NUM_CLASSES:
        raise BadFile(f"label {data.max()} outside 0-9")
    return data


def repair(cached: bool, pair: bool = False) -> str:
    """How to mend a bad file (or a mismatched pair): in the cache, delete it so that the next
    run downloads it again; elsewhere, bring an intact copy."""
    if cached:
        return f"delete {'both' if pair else 'it'} and run again to download a fresh copy"
    return "replace both with a matching pair" if pair else "replace it with an intact copy"


def read_idx(path: Path, magic: int, cached: bool = False) -> np.ndarray:
    """parse_idx, its faults as a one-line DataError naming the file, the fault and the fix
    (`cached`: the file is in the download cache)."""
    try:
        return parse_idx(path, magic)
    except BadFile as fault:
        raise DataError(f"{path}: {fault}; {repair(cached)}") from None


def read_split(directory: Path, split: str, cached: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, 28, 28) and labels (N,) of split 'train' or 'test'."""
    image_path = find_file(directory, FILES[f"{split}_images"])
    label_path = find_file(directory, FILES[f"{split}_labels"])
    images = read_idx(image_path, IMAGE_MAGIC, cached)
    labels = read_idx(label_path, LABEL_MAGIC, cached)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds "
            f"{len(labels)} labels, so they are from different sets; {repair(cached, pair=True)}"
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
    else in [0, 255]. Labels are class indices (N,), or one-hot float64 (N, 10).
    Bad arguments or files raise DataError, naming the argument or file and the fix."""
    flags = {"normalize": normalize, "flatten": flatten, "one_hot_label": one_hot_label}
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(f"{name}={value!r} must be True or False")
    directory = locate(dataset, data_dir)
    cached = directory == cache_dir(dataset)
    splits = []
    for split in ("train", "test"):
        images, labels = read_split(directory, split, cached)
        x = pixel_values(images, normalize)
        x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, IMAGE_SIDE, IMAGE_SIDE)
        t = np.eye(NUM_CLASSES)[labels] if one_hot_label else labels.astype(np.int64)
        splits.append((x, t))
    return splits[0], splits[1]


def pixel_values(images: np.ndarray, normalize: bool) -> np.ndarray:
    """uint8 images as float64: in [0, 1] (each code / 255.0) when normalize, else [0, 255]."""
    x = images.astype(np.float64)
    if normalize:
        x /= 255.0
    return x


class ImageCodes:
    """Images (N, D) kept as their uint8 codes, 8x smaller than float64, for shipping the
    training set to every node: rows read back are the float64 values load_mnist gives,
    bit for bit (the same conversion, pixel_values)."""

    def __init__(self, codes: np.ndarray, normalize: bool) -> None:
        self.codes, self.normalize = codes, normalize

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows) -> np.ndarray:
        return pixel_values(self.codes[rows], self.normalize)

    def subset(self, rows) -> ImageCodes:
        """The codes of these rows, still as codes."""
        return ImageCodes(self.codes[rows], self.normalize)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes

    @classmethod
    def of(cls, x: np.ndarray, chunk_values: int = 1 << 22) -> ImageCodes | None:
        """x's codes, if every value of x, bit for bit, is one that pixel_values gives
        (normalised or not), else None: a training set of the user's own may be any
        float64."""
        if x.dtype != np.float64 or x.ndim != 2 or x.size == 0:
            return None
        chunk_rows = max(1, chunk_values // x.shape[1])
        for normalize in (True, False):
            codes = np.empty(x.shape, np.uint8)
            for start in range(0, len(x), chunk_rows):
                part = x[start : start + chunk_rows]
                nearest = np.rint(part * 255.0 if normalize else part)
                if not np.all((nearest >= 0) & (nearest <= 255)):
                    break
                chunk = nearest.astype(np.uint8)
                # bits, not values: -0.0 == 0.0, but it would read back as 0.0
                if not np.array_equal(pixel_values(chunk, normalize).view(np.uint64),
                                      part.view(np.uint64)):  # fmt: skip
                    break
                codes[start : start + chunk_rows] = chunk
            else:
                return cls(codes, normalize)
        return None


def shipped_images(x: np.ndarray | ImageCodes) -> ImageCodes | np.ndarray:
    """x as it goes to the workers: its uint8 codes when it is made of pixel values (8x
    fewer bytes, the same rows read back), else x itself (codes already made: as they are)."""
    if isinstance(x, ImageCodes):
        return x
    codes = ImageCodes.of(x)
    return x if codes is None else codes


def input_density(x: np.ndarray | ImageCodes) -> np.ndarray:
    """(D,) the fraction of the rows of x (N, D) in which each input is nonzero: the fast
    engine skips zero inputs, so this is what the nudges of an input's weights cost."""
    values = x.codes if isinstance(x, ImageCodes) else x  # code 0 is the value 0.0
    return np.count_nonzero(values, axis=0) / len(values)
