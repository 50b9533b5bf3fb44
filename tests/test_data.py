"""load_mnist: the real set, the download path against a real local HTTP server, bad files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from idx_files import fake_split, idx_bytes, write_fake_mnist

import distnum.data
from distnum import cli
from distnum.data import (
    DATASETS,
    DataError,
    Dataset,
    ImageCodes,
    download,
    input_density,
    load_mnist,
    locate,
    shipped_images,
)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and no DISTNUM_DATA, so none reads the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTNUM_DATA", raising=False)
    return tmp_path / "cache" / "distnum" / "mnist"


# --- the real data set -------------------------------------------------------------------


def test_real_mnist_shapes_values_and_label_counts(mnist_dir):
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=mnist_dir)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float64
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert x_train.mean() == pytest.approx(0.1307, abs=1e-4)
    assert np.bincount(t_train).tolist() == TRAIN_COUNTS
    assert np.bincount(t_test).tolist() == TEST_COUNTS


def test_real_mnist_one_hot_unnormalized_unflattened(mnist_dir, monkeypatch):
    monkeypatch.setenv("DISTNUM_DATA", str(mnist_dir))
    (x_train, t_train), (_, t_test) = load_mnist(normalize=False, flatten=False, one_hot_label=True)
    assert x_train.shape == (60000, 1, 28, 28) and x_train.max() == 255.0
    assert t_train.shape == (60000, 10) and t_test.shape == (10000, 10)
    assert np.array_equal(t_train.sum(axis=1), np.ones(60000))
    assert t_train.sum(axis=0).tolist() == TRAIN_COUNTS


# --- where the files come from -----------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_the_training_set_ships_as_uint8_codes_and_reads_back_the_same_bits(mnist_dir, normalize):
    (x_train, _), _ = load_mnist(normalize=normalize, data_dir=mnist_dir)
    codes = ImageCodes.of(x_train)
    assert codes.codes.dtype == np.uint8 and codes.nbytes * 8 == x_train.nbytes
    assert isinstance(shipped_images(x_train), ImageCodes)
    assert shipped_images(codes) is codes  # made once, shipped as they are
    rows = np.random.default_rng(0).choice(len(x_train), 100)
    for picked in (rows, slice(0, 2), slice(59_990, None)):
        assert codes[picked].dtype == np.float64
        assert codes[picked].tobytes() == x_train[picked].tobytes()
        assert codes.subset(picked)[:].tobytes() == x_train[picked].tobytes()
    # the shards' costs come out the same from either
    density = input_density(x_train)
    assert density.shape == (784,) and 0 < density.mean() < 0.5  # MNIST's black borders
    assert input_density(codes).tobytes() == density.tobytes()


def test_a_training_set_of_other_values_is_shipped_as_it_is():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4)) / 255.0
    assert ImageCodes.of(pixels) is not None
    negative_zero = pixels.copy()
    negative_zero[0, 0] = -0.0  # equal to 0.0, but not its bits
    for other in (pixels + 1e-12, pixels * -1.0, pixels.astype(np.float32), pixels[:, :, None],
                  negative_zero):  # fmt: skip
        assert ImageCodes.of(other) is None
        assert shipped_images(other) is other


def test_uncompressed_and_gzip_read_the_same(tmp_path):
    write_fake_mnist(tmp_path / "gz", compress=True)
    write_fake_mnist(tmp_path / "raw", compress=False)
    (a, ta), (b, tb) = load_mnist(data_dir=tmp_path / "gz")
    (c, tc), (d, td) = load_mnist(data_dir=tmp_path / "raw")
    images, labels = fake_split(60, 1)
    assert np.array_equal(a, c) and np.array_equal(b, d) and np.array_equal(ta, tc)
    assert np.array_equal(a, images.reshape(60, 784) / 255.0)
    assert np.array_equal(ta, labels)


DOTTED = {
    "train_images": "train-images.idx3-ubyte",
    "train_labels": "train-labels.idx1-ubyte",
    "test_images": "t10k-images.idx3-ubyte",
    "test_labels": "t10k-labels.idx1-ubyte",
}


@pytest.mark.parametrize("compress", [False, True])
def test_dotted_names_of_some_mirrors_are_read(tmp_path, compress):
    write_fake_mnist(tmp_path / "standard")
    written = write_fake_mnist(tmp_path / "dotted", compress=compress, names=DOTTED)
    assert sorted(os.listdir(tmp_path / "dotted")) == sorted(written)
    (a, ta), (b, tb) = load_mnist(data_dir=tmp_path / "standard")
    (c, tc), (d, td) = load_mnist(data_dir=tmp_path / "dotted")
    for mine, theirs in ((a, c), (ta, tc), (b, d), (tb, td)):
        assert np.array_equal(mine, theirs)


def test_order_data_dir_then_env_then_cache(tmp_path, monkeypatch, isolated_cache):
    for name in ("arg", "env"):
        write_fake_mnist(tmp_path / name)
    write_fake_mnist(isolated_cache)
    monkeypatch.setenv("DISTNUM_DATA", str(tmp_path / "env"))
    assert locate(data_dir=tmp_path / "arg") == tmp_path / "arg"
    assert locate() == tmp_path / "env"
    monkeypatch.delenv("DISTNUM_DATA")
    assert locate() == isolated_cache


def test_named_directory_without_files_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data_dir=.* has no train-images-idx3"):
        load_mnist(data_dir=tmp_path)
    with pytest.raises(DataError, match=r"data_dir=.*nowhere' is not a directory"):
        load_mnist(data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("DISTNUM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="DISTNUM_DATA=.*nowhere is not a directory"):
        load_mnist()


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"data_dir": 5}, "data_dir=5 is not a folder: give a str or pathlib.Path"),
        ({"data_dir": ""}, "data_dir='' is not a folder"),
        ({"data_dir": b"/tmp"}, "data_dir=b'/tmp' is not a folder"),
        ({"normalize": "no"}, "normalize='no' must be True or False"),
        ({"one_hot_label": None}, "one_hot_label=None must be True or False"),
        ({"dataset": ["mnist"]}, "unknown dataset ['mnist']; choose one of mnist"),
    ],
)
def test_bad_python_arguments_name_the_argument(arguments, problem):
    with pytest.raises(DataError) as failure:
        load_mnist(**arguments)
    assert str(failure.value).startswith(problem) and "\n" not in str(failure.value)


@pytest.mark.parametrize("cache_home", ["/proc/x", "{tmp}/a-file"])
def test_unwritable_cache_names_the_folder_and_the_fix(tmp_path, monkeypatch, cache_home):
    (tmp_path / "a-file").write_text("not a folder")
    cache_home = cache_home.format(tmp=tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home)
    with pytest.raises(DataError) as failure:
        load_mnist()
    message = str(failure.value)
    assert "\n" not in message
    assert f"the cache folder {cache_home}/distnum/mnist cannot be written" in message
    for fix in ("DISTNUM_DATA=DIR", "data_dir='DIR'", "XDG_CACHE_HOME"):
        assert fix in message
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_unwritable_cache_from_the_command_line_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/x")
    run = subprocess.run(
        [sys.executable, "-m", "distnum", "bench"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "/proc/x/distnum/mnist cannot be written" in run.stderr


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of mnist"):
        load_mnist(dataset="cifar")


# --- download, for real, from a server on 127.0.0.1 -------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` under /mnist/; those in `truncate` cut short of their Content-Length,
    those in `stall` cut short and then held open for a second."""

    files: dict[str, bytes] = {}
    truncate: set[str] = set()
    stall: set[str] = set()

    def do_GET(self):  # noqa: N802 (the http.server API)
        folder, _, name = self.path.rpartition("/")
        if folder != "/mnist" or name not in self.files:
            self.send_error(404, "Not Found")
            return
        data = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if name in self.truncate | self.stall else data)
        if name in self.stall:
            self.wfile.flush()
            time.sleep(1)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving small generated MNIST .gz files."""
    files = write_fake_mnist(tmp_path / "served")
    handler = type("Served", (Handler,), {"files": dict(files), "truncate": set(), "stall": set()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    yield f"http://127.0.0.1:{httpd.server_address[1]}/mnist/", handler, md5
    httpd.shutdown()
    httpd.server_close()


def test_download_lands_in_cache_and_loads(server, isolated_cache):
    url, handler, md5 = server
    download(Dataset("mnist", mirrors=(url,), md5=md5), isolated_cache)
    assert sorted(p.name for p in isolated_cache.iterdir()) == sorted(md5)
    for name, data in handler.files.items():
        assert (isolated_cache / name).read_bytes() == data
    (x_train, _), (x_test, _) = load_mnist()  # found in the cache now, no download
    assert x_train.shape == (60, 784) and x_test.shape == (20, 784)


def test_falls_back_to_the_next_mirror(server, isolated_cache):
    url, _, md5 = server
    dead_mirror = url.replace("/mnist/", "/gone/")  # 404s on every file
    download(Dataset("mnist", mirrors=(dead_mirror, url), md5=md5), isolated_cache)
    assert sorted(p.name for p in isolated_cache.iterdir()) == sorted(md5)


def assert_cache_empty(cache: Path):
    assert not cache.exists() or list(cache.iterdir()) == []


def test_wrong_checksum_leaves_nothing(server, isolated_cache):
    url, _, md5 = server
    wrong = {name: "0" * 32 for name in md5}
    with pytest.raises(DataError, match="wrong checksum"):
        download(Dataset("mnist", mirrors=(url,), md5=wrong), isolated_cache)
    assert_cache_empty(isolated_cache)


def test_truncated_transfer_leaves_nothing(server, isolated_cache):
    url, handler, md5 = server
    handler.truncate.update(handler.files)
    with pytest.raises(DataError, match="truncated transfer"):
        download(Dataset("mnist", mirrors=(url,), md5=md5), isolated_cache)
    assert_cache_empty(isolated_cache)


def test_stalled_transfer_says_so_and_leaves_nothing(server, isolated_cache, monkeypatch):
    url, handler, md5 = server
    handler.stall.update(handler.files)
    monkeypatch.setattr(distnum.data, "DOWNLOAD_TIMEOUT_S", 0.2)
    with pytest.raises(DataError, match="the transfer stalled \\(no data for 0.2 s\\)"):
        download(Dataset("mnist", mirrors=(url,), md5=md5), isolated_cache)
    assert_cache_empty(isolated_cache)


@pytest.mark.parametrize(
    "served",
    [
        lambda good: good[: len(good) // 2],  # the mirror's own copy is cut short
        lambda good: good + b"trailing garbage",
        lambda good: b"<html>Service Unavailable</html>",
    ],
    ids=["truncated", "trailing-garbage", "html-page"],
)
def test_mirror_serving_a_damaged_file_keeps_only_whole_files(
    server, isolated_cache, monkeypatch, served
):
    url, handler, md5 = server
    monkeypatch.setitem(DATASETS, "mnist", Dataset("mnist", mirrors=(url,), md5=md5))
    name = "t10k-labels-idx1-ubyte.gz"  # the last of the four to be fetched
    good, handler.files[name] = handler.files[name], served(handler.files[name])
    with pytest.raises(DataError) as failure:
        load_mnist()
    assert f"{name}: wrong checksum" in str(failure.value) and "\n" not in str(failure.value)
    kept = {p.name: p.read_bytes() for p in isolated_cache.iterdir()}
    assert kept == {n: data for n, data in handler.files.items() if n != name}  # no partial file
    handler.files[name] = good  # the mirror mended, the next run fetches only what is missing
    (x_train, _), _ = load_mnist()
    assert (isolated_cache / name).read_bytes() == good and x_train.shape == (60, 784)


def test_404_leaves_nothing(server, isolated_cache):
    url, _, md5 = server
    with pytest.raises(DataError, match="HTTP 404"):
        download(Dataset("mnist", mirrors=(url + "nothing-here/",), md5=md5), isolated_cache)
    assert_cache_empty(isolated_cache)


def test_offline_message_names_places_and_fix(isolated_cache, monkeypatch):
    closed = Dataset("mnist", mirrors=("http://127.0.0.1:9/",), md5={"x.gz": "0" * 32})
    monkeypatch.setitem(DATASETS, "mnist", closed)
    with pytest.raises(DataError) as failure:
        load_mnist()
    message = str(failure.value)
    assert "\n" not in message
    for part in ("DISTNUM_DATA", str(isolated_cache), "cannot connect", "data_dir="):
        assert part in message
    assert not isolated_cache.parent.parent.exists()  # no empty cache folder left behind


def test_an_offline_train_leaves_no_folder_behind(isolated_cache, monkeypatch, tmp_path, capsys):
    closed = Dataset("mnist", mirrors=("http://127.0.0.1:9/",), md5={"x.gz": "0" * 32})
    monkeypatch.setitem(DATASETS, "mnist", closed)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.run(["train", "--quiet"]) == 2
    assert "Offline, copy the four IDX files" in capsys.readouterr().err
    assert list(work.iterdir()) == []  # no runs/ and no runs/train-<time>/
    assert not isolated_cache.parent.parent.exists()


# --- bad files ---------------------------------------------------------------------------


def damage(directory: Path, name: str, transform) -> Path:
    path = directory / name
    path.write_bytes(transform(path.read_bytes()))
    return path


def gz(transform):
    return lambda data: gzip.compress(transform(gzip.decompress(data)), mtime=0)


def flip_crc(data: bytes) -> bytes:
    """The gzip data with one bit of its CRC-32 (the 8 bytes before the end) flipped."""
    return data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]


def no_items(data: bytes) -> bytes:
    """An IDX file's header with its item count set to 0, and nothing after it."""
    ndim = data[3]
    return data[:4] + bytes(4) + data[8 : 4 + 4 * ndim]


@pytest.mark.parametrize(
    "name, transform, problem",
    [
        (
            "train-images-idx3-ubyte.gz",
            gz(lambda d: (2049).to_bytes(4, "big") + d[4:]),
            "holds labels, not images \\(magic number 2049\\)",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            gz(lambda d: (2051).to_bytes(4, "big") + d[4:]),
            "holds images, not labels \\(magic number 2051\\)",
        ),
        (
            "train-images-idx3-ubyte.gz",
            gz(lambda d: (2050).to_bytes(4, "big") + d[4:]),
            "wrong magic number 2050 \\(expected 2051: images\\), not MNIST IDX",
        ),
        ("t10k-images-idx3-ubyte.gz", gz(lambda d: d[:-100]), "truncated \\(.* header says"),
        ("t10k-images-idx3-ubyte.gz", gz(lambda d: d + b"\0"), "has trailing bytes \\("),
        ("t10k-images-idx3-ubyte.gz", gz(lambda d: d[:10]), "truncated \\(10 bytes, shorter than"),
        ("t10k-images-idx3-ubyte.gz", lambda d: d[: len(d) // 2], "truncated gzip data"),
        ("t10k-images-idx3-ubyte.gz", flip_crc, "corrupt gzip data \\(incorrect data check\\)"),
        (
            "train-images-idx3-ubyte.gz",
            lambda d: d + b"<html>",
            "has 6 bytes of trailing data after the gzip stream",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            lambda d: d + bytes(512),
            "has 512 bytes of trailing data after the gzip stream",
        ),
        (
            "train-images-idx3-ubyte.gz",
            gzip.decompress,
            "not a gzip file but an uncompressed IDX file: remove .gz from its name",
        ),
        ("train-images-idx3-ubyte.gz", lambda d: b"<html>Not Found</html>", "not a gzip file;"),
        ("t10k-labels-idx1-ubyte.gz", lambda d: b"", "empty \\(0 bytes\\)"),
        ("train-images-idx3-ubyte.gz", gz(no_items), "holds 0 images"),
        ("t10k-labels-idx1-ubyte.gz", gz(no_items), "holds 0 labels"),
        ("t10k-labels-idx1-ubyte.gz", gz(lambda d: d[:8] + b"\x0c" + d[9:]), "label 12 outside"),
        ("t10k-labels-idx1-ubyte.gz", gz(lambda d: d[:-1] + b"\xff"), "label 255 outside"),
        (
            "t10k-images-idx3-ubyte.gz",
            gz(lambda d: d[:8] + (27).to_bytes(4, "big") + d[12:]),
            "images of 27x28",
        ),
    ],
)
def test_bad_file_gives_clear_error(tmp_path, name, transform, problem):
    write_fake_mnist(tmp_path)
    path = damage(tmp_path, name, transform)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {problem}") as failure:
        load_mnist(data_dir=tmp_path)
    message = str(failure.value)
    assert message.endswith("; replace it with an intact copy") and "\n" not in message


def two_members(data: bytes) -> bytes:
    """The same content as two concatenated gzip members, as `cat a.gz b.gz` makes."""
    content = gzip.decompress(data)
    return gzip.compress(content[:9000], mtime=0) + gzip.compress(content[9000:], mtime=0)


def test_concatenated_gzip_members_are_one_valid_file(tmp_path):
    write_fake_mnist(tmp_path)
    damage(tmp_path, "train-images-idx3-ubyte.gz", two_members)
    (x_train, _), _ = load_mnist(data_dir=tmp_path)
    assert np.array_equal(x_train, fake_split(60, 1)[0].reshape(60, 784) / 255.0)


def test_image_and_label_counts_differ(tmp_path):
    write_fake_mnist(tmp_path)
    _, labels = fake_split(19, 3)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(labels, 2049), mtime=0)
    )
    with pytest.raises(
        DataError,
        match="holds 20 images but .* holds 19 labels, so they are from different sets; "
        "replace both with a matching pair$",
    ):
        load_mnist(data_dir=tmp_path)


def test_damaged_cache_file_is_refused_then_downloaded_again(server, isolated_cache, monkeypatch):
    url, handler, md5 = server
    monkeypatch.setitem(DATASETS, "mnist", Dataset("mnist", mirrors=(url,), md5=md5))
    load_mnist()  # downloads the four files into the cache
    path = damage(isolated_cache, "t10k-images-idx3-ubyte.gz", flip_crc)
    with pytest.raises(DataError) as failure:
        load_mnist()
    assert str(failure.value) == (
        f"{path}: corrupt gzip data (incorrect data check); "
        "delete it and run again to download a fresh copy"
    )
    path.unlink()
    (_, _), (x_test, _) = load_mnist()
    assert path.read_bytes() == handler.files[path.name] and x_test.shape == (20, 784)
