"""model/data.py: IDX parsing, loading, fetching from a local HTTP server, and the train/validation split."""

from __future__ import annotations

import http.server
import struct
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from model.data import (
    ENV_DIR,
    EXPECTED,
    FILES,
    NUM_CLASSES,
    FashionMNIST,
    IDXError,
    classes_named,
    fetch,
    main,
    parse_class,
    parse_idx,
    read_idx,
    resolve_dir,
    to_model_range,
)

NAMES = list(FILES.values())  # the order fetch() downloads in


# --- parsing -------------------------------------------------------------------------------------


def test_parse_idx_decodes_labels_and_images_from_hand_built_bytes():
    labels = struct.pack(">II", 2049, 3) + bytes([7, 0, 9])
    assert parse_idx(labels, "l").tolist() == [7, 0, 9]

    pixels = np.arange(2 * 28 * 28, dtype=np.uint32) % 251
    images = struct.pack(">IIII", 2051, 2, 28, 28) + pixels.astype(np.uint8).tobytes()
    out = parse_idx(images, "i")
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8
    assert out[1, 0, 0] == 784 % 251 and out[0, 27, 27] == 783 % 251  # row-major, image after image
    out[0, 0, 0] = 1  # writable: torch.from_numpy warns on read-only buffers


@pytest.mark.parametrize(
    ("raw", "expected_magic", "message"),
    [
        (b"\x00\x00\x08", None, r"f\.idx: truncated header \(3 bytes"),
        (struct.pack(">II", 2050, 1) + b"\x00", None, r"f\.idx: wrong magic number 2050, expected 2049 \(labels\) or"),
        (struct.pack(">II", 2049, 1) + b"\x00", 2051, r"f\.idx: wrong magic number 2049, expected 2051"),
        (struct.pack(">IIII", 2051, 1, 27, 28) + bytes(27 * 28), None, r"f\.idx: images are 27x28, expected 28x28"),
        (struct.pack(">II", 2051, 1) + b"\x00\x00", None, r"f\.idx: truncated header .*need 16"),
        (struct.pack(">II", 2049, 5) + bytes(4), None, r"f\.idx: truncated or padded body \(4 bytes, header promises"),
        (struct.pack(">II", 2049, 5) + bytes(6), None, r"f\.idx: truncated or padded body \(6 bytes"),
    ],
    ids=[
        "short-header",
        "unknown-magic",
        "unexpected-magic",
        "wrong-shape",
        "short-image-header",
        "short-body",
        "long-body",
    ],
)
def test_parse_idx_rejects_malformed_files_naming_file_and_problem(raw, expected_magic, message):
    with pytest.raises(IDXError, match=message):
        parse_idx(raw, "f.idx", expected_magic)


def test_read_idx_reads_gzipped_and_plain_files_and_names_broken_ones(tmp_path, idx_tools):
    images = idx_tools.small_dataset()["train_images"]
    (tmp_path / "a.gz").write_bytes(idx_tools.gz(idx_tools.idx_bytes(images)))
    (tmp_path / "a").write_bytes(idx_tools.idx_bytes(images))
    assert np.array_equal(read_idx(tmp_path / "a.gz", 2051), images)
    assert np.array_equal(read_idx(tmp_path / "a", 2051), images)

    (tmp_path / "plain.gz").write_bytes(idx_tools.idx_bytes(images))  # not actually gzipped
    with pytest.raises(IDXError, match=r"plain\.gz: cannot decompress"):
        read_idx(tmp_path / "plain.gz")
    (tmp_path / "damaged.gz").write_bytes(_damage(idx_tools.gz(idx_tools.idx_bytes(images))))
    with pytest.raises(IDXError, match=r"damaged\.gz: cannot decompress"):
        read_idx(tmp_path / "damaged.gz")


# --- loading -------------------------------------------------------------------------------------


def test_load_returns_the_arrays_with_int64_labels(small_fashion_dir, idx_tools):
    expected = idx_tools.small_dataset()
    data = FashionMNIST.load(small_fashion_dir, check_counts=False)
    for key in FILES:
        assert np.array_equal(getattr(data, key), expected[key]), key
    assert data.train_labels.dtype == np.int64 and data.test_labels.dtype == np.int64


def test_load_checks_official_counts_and_names_missing_files(small_fashion_dir):
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte\.gz: holds 40 items, expected 60000"):
        FashionMNIST.load(small_fashion_dir)
    (small_fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte\.gz: missing from .*model\.data fetch"):
        FashionMNIST.load(small_fashion_dir, check_counts=False)


def test_data_dir_comes_from_the_argument_or_the_environment(small_fashion_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    with pytest.raises(ValueError, match=f"--data-dir or set {ENV_DIR}"):
        resolve_dir(None)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_dir(tmp_path / "nowhere")
    monkeypatch.setenv(ENV_DIR, str(small_fashion_dir))
    assert resolve_dir(None) == small_fashion_dir
    assert resolve_dir(tmp_path) == tmp_path  # the argument wins over the environment
    assert len(FashionMNIST.load(check_counts=False).test_labels) == 20


def test_to_model_range_maps_0_255_to_minus_one_one():
    images = np.array([[[0, 255], [51, 204]]], dtype=np.uint8)
    x = to_model_range(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype.is_floating_point
    np.testing.assert_allclose(x.numpy().ravel(), [-1.0, 1.0, -0.6, 0.6], atol=1e-6)


# --- fetch against a local server ----------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (payload, Content-Length to announce or None)."""

    def do_GET(self):
        entry = self.server.routes.get(self.path)
        if entry is None:
            self.send_error(404)
            return
        payload, announced = entry
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(announced or len(payload)))
        self.end_headers()
        self.wfile.write(payload)  # HTTP/1.0: the connection closes after this, short or not

    def log_message(self, *args):
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[dict], str]]:
    """Start a server on 127.0.0.1 (free port) for {file name: payload or (payload, announced length)}."""
    servers = []

    def start(files: dict) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.routes = {f"/mirror/{n}": (v if isinstance(v, tuple) else (v, None)) for n, v in files.items()}
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/mirror/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def official_raw(idx_tools) -> dict[str, bytes]:
    """Uncompressed IDX files with the official counts (mostly zeros, so they gzip in a blink)."""
    raw = {}
    for key, name in FILES.items():
        magic, count = EXPECTED[key]
        if magic == 2051:
            array = np.zeros((count, 28, 28), np.uint8)
            array[:NUM_CLASSES, 14, 14] = np.arange(1, NUM_CLASSES + 1) * 20
        else:
            array = (np.arange(count) % NUM_CLASSES).astype(np.uint8)
        raw[name] = idx_tools.idx_bytes(array)
    return raw


@pytest.fixture(scope="module")
def official(official_raw, idx_tools) -> dict[str, bytes]:
    return {name: idx_tools.gz(raw) for name, raw in official_raw.items()}


def test_fetch_downloads_verifies_and_writes_all_four_files(tmp_path, serve, official):
    dest = tmp_path / "new" / "fashion"  # created on demand
    written = fetch(dest, serve(official))
    assert written == [dest / n for n in NAMES]
    for name in NAMES:
        assert (dest / name).read_bytes() == official[name]
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)  # no temporary files left behind
    data = FashionMNIST.load(dest)  # passes the full check, official counts included
    assert data.train_images[3, 14, 14] == 80 and data.test_labels[:12].tolist() == [*range(10), 0, 1]


def test_fetch_cli_takes_the_url_from_the_environment(tmp_path, serve, official, monkeypatch, capsys):
    monkeypatch.setenv("FASHION_MNIST_URL", serve(official))
    assert main(["fetch", "--dest", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"ok {tmp_path / n}" for n in NAMES]


def _replace_magic(raw: bytes, magic: int) -> bytes:
    return struct.pack(">I", magic) + raw[4:]


def _damage(payload: bytes) -> bytes:
    damaged = bytearray(payload)
    damaged[10] = 0xFF  # the first deflate block header, right after gzip's: "invalid block type"
    return bytes(damaged)


# (file to break, how: (gzipped payload, raw payload, gz) -> served value, expected message)
BROKEN = {
    "gzip-cut-short": ("t10k-images-idx3-ubyte.gz", lambda p, r, gz: p[: len(p) // 2], r"not a valid gzip file"),
    "idx-body-cut-short": (
        "t10k-images-idx3-ubyte.gz",
        lambda p, r, gz: gz(r[:-784]),
        r"truncated or padded body \(7839216 bytes, header promises 7840000\)",
    ),
    "wrong-magic": (
        "t10k-images-idx3-ubyte.gz",
        lambda p, r, gz: gz(_replace_magic(r, 2049)),
        r"wrong magic number 2049, expected 2051",
    ),
    "wrong-magic-first-file": (
        "train-images-idx3-ubyte.gz",
        lambda p, r, gz: gz(_replace_magic(r, 2052)),
        r"wrong magic number 2052, expected 2051",
    ),
    "too-few-items": (
        "t10k-labels-idx1-ubyte.gz",
        lambda p, r, gz: gz(struct.pack(">II", 2049, 999) + bytes(999)),
        r"holds 999 items, expected 10000",
    ),
    "label-out-of-range": (
        "train-labels-idx1-ubyte.gz",
        lambda p, r, gz: gz(r[:-1] + bytes([10])),
        r"label 10 out of range 0-9",
    ),
    "damaged-deflate-stream": ("t10k-images-idx3-ubyte.gz", lambda p, r, gz: _damage(p), r"not a valid gzip file"),
    "connection-closed-early": (
        "t10k-images-idx3-ubyte.gz",
        lambda p, r, gz: (p[: len(p) // 2], len(p)),  # announces more than it sends
        r"download from http://.* failed \(IncompleteRead",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_fetch_rejects_a_broken_file_naming_it_and_leaves_nothing_under_its_name(
    case, tmp_path, serve, official, official_raw, idx_tools
):
    broken, make, message = BROKEN[case]
    files = dict(official)
    files[broken] = make(official[broken], official_raw[broken], idx_tools.gz)
    with pytest.raises(IDXError, match=rf"^{broken.replace('.', '[.]')}: .*{message}"):
        fetch(tmp_path, serve(files))
    at = NAMES.index(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES[:at])  # no .part, no broken file
    for name in NAMES[:at]:  # the files before it were verified and are complete
        assert (tmp_path / name).read_bytes() == official[name]


def test_fetch_names_a_file_missing_on_the_server(tmp_path, serve, official):
    files = {n: p for n, p in official.items() if n != "t10k-labels-idx1-ubyte.gz"}
    with pytest.raises(IDXError, match=r"^t10k-labels-idx1-ubyte\.gz: download from .* failed \(HTTP Error 404"):
        fetch(tmp_path, serve(files))


def test_a_failed_fetch_keeps_the_previous_good_file(tmp_path, serve, official, official_raw, idx_tools):
    name = "t10k-images-idx3-ubyte.gz"
    (tmp_path / name).write_bytes(b"the copy from last week")
    files = {**official, name: official[name][:1000]}
    with pytest.raises(IDXError, match=name):
        fetch(tmp_path, serve(files))
    assert (tmp_path / name).read_bytes() == b"the copy from last week"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_fetch_cli_reports_the_broken_file_and_exits_2(tmp_path, serve, official, official_raw, idx_tools, capsys):
    files = {**official, "t10k-images-idx3-ubyte.gz": idx_tools.gz(_replace_magic(official_raw[NAMES[2]], 2049))}
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch", "--dest", str(tmp_path), "--url", serve(files)])
    assert exit_info.value.code == 2
    assert "error: t10k-images-idx3-ubyte.gz: wrong magic number 2049, expected 2051" in capsys.readouterr().err


# --- the real data and its split -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real(fashion_mnist_dir) -> FashionMNIST:
    return FashionMNIST.load(fashion_mnist_dir)


def test_real_data_has_the_official_counts_and_balanced_classes(real):
    assert real.train_images.shape == (60_000, 28, 28) and real.test_images.shape == (10_000, 28, 28)
    assert np.bincount(real.train_labels).tolist() == [6_000] * NUM_CLASSES
    assert np.bincount(real.test_labels).tolist() == [1_000] * NUM_CLASSES
    assert real.train_images.max() == 255 and real.train_images.min() == 0


def test_split_is_55000_5000_stratified_shuffled_and_reproducible(real):
    (tx, ty), (vx, vy) = real.split()
    assert tx.shape == (55_000, 28, 28) and vx.shape == (5_000, 28, 28)
    assert np.bincount(ty).tolist() == [5_500] * NUM_CLASSES
    assert np.bincount(vy).tolist() == [500] * NUM_CLASSES
    assert len(np.unique(ty[:200])) == NUM_CLASSES and len(np.unique(vy[:200])) == NUM_CLASSES  # not grouped
    (tx2, ty2), (vx2, vy2) = real.split()
    assert np.array_equal(tx, tx2) and np.array_equal(ty, ty2) and np.array_equal(vx, vx2) and np.array_equal(vy, vy2)
    (_, _), (vx3, _) = real.split(seed=1)
    assert not np.array_equal(vx, vx3)


def test_split_is_a_disjoint_partition_that_keeps_images_with_their_labels(real):
    # Tag every training image with its index (two pixels), split, and read the indices back.
    n = len(real.train_labels)
    tagged = np.zeros((n, 28, 28), np.uint8)
    tagged[:, 0, 0], tagged[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    (tx, ty), (vx, vy) = FashionMNIST(tagged, real.train_labels, real.test_images, real.test_labels).split()
    train_idx = tx[:, 0, 0].astype(int) * 256 + tx[:, 0, 1]
    val_idx = vx[:, 0, 0].astype(int) * 256 + vx[:, 0, 1]
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(n))
    assert np.array_equal(ty, real.train_labels[train_idx]) and np.array_equal(vy, real.train_labels[val_idx])
    (rx, _), (rvx, _) = real.split()  # the split depends on labels and seed only, so the real one matches
    assert np.array_equal(rvx, real.train_images[val_idx]) and np.array_equal(rx, real.train_images[train_idx])


@pytest.mark.parametrize("val_size", [0, 60_000, -5])
def test_split_rejects_impossible_validation_sizes(real, val_size):
    with pytest.raises(ValueError, match=r"val_size must be in 1\.\.59999"):
        real.split(val_size=val_size)


def test_info_cli_prints_the_split_sizes(fashion_mnist_dir, capsys):
    assert main(["info", "--data-dir", str(fashion_mnist_dir)]) == 0
    assert "train 55000  validation 5000  test 10000" in capsys.readouterr().out


def test_parse_class_takes_indices_digit_strings_and_forgiving_names():
    assert parse_class(3) == parse_class("3") == parse_class(" 3 ") == 3
    assert parse_class("Ankle Boot") == parse_class("ankle_boot") == parse_class("ankle-boot") == 9
    assert parse_class("t-shirt/top") == parse_class("T-Shirt Top") == parse_class("top") == parse_class("tshirt") == 0
    for bad in (10, -1, "10", "hat", "", True, 2.0, None):
        with pytest.raises(ValueError, match=r"must be an index 0\.\.9 or a class name \(t-shirt/top, .*got"):
            parse_class(bad)
    assert parse_class("b", ("a", "b")) == 1  # another model's class names


def test_parse_class_reads_a_prompt_that_names_one_class():
    # Plurals, articles, case and punctuation are forgiven; the words of t-shirt are not two classes.
    assert parse_class("Ankle boots") == parse_class("a pair of boots") == 9
    assert parse_class("a pullover") == 2 and parse_class("Dresses.") == 3 and parse_class("two T-shirts") == 0
    assert parse_class("shirts") == 6 and parse_class("a photo of a bag") == 8
    assert classes_named("a dress and a coat, and another dress") == [3, 4]
    with pytest.raises(ValueError, match=r"names 2 classes \(dress, coat\) but must name one: an index 0\.\.9"):
        parse_class("a dress and a coat")
    with pytest.raises(ValueError, match=r"must be an index 0\.\.9 .*got 'a hat'"):
        parse_class("a hat")
