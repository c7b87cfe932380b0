"""The CIFAR-100 loader on files in the official format, and its download path."""

import functools
import hashlib
import http.server
import os
import pickle
import threading

import numpy as np
import pytest

from tests.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, make_images
from training import data as cifar


def test_folder_is_read_in_the_official_layout(cifar_dir):
    data = cifar.load(cifar_dir, val_size=500)
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 500, 500)
    assert data.class_names == CLASS_NAMES
    assert data.superclass_names == SUPERCLASS_NAMES
    assert data.fine_to_coarse == FINE_TO_COARSE
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
        assert (np.asarray(FINE_TO_COARSE)[split.fine] == split.coarse).all()
    # The planes were turned into pixels the right way round: the test images are
    # exactly what the generator drew for their labels.
    np.testing.assert_array_equal(data.test.images, make_images(data.test.fine, seed=2))


def test_parent_folder_and_tarball_give_the_same_data(cifar_dir, cifar_tarball):
    a = cifar.load(cifar_dir.parent, val_size=500)
    b = cifar.load(cifar_tarball, val_size=500)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.fine, b.test.fine)
    assert a.class_names == b.class_names


def test_validation_split_is_stratified_disjoint_and_fixed(cifar_dir):
    data = cifar.load(cifar_dir, val_size=500)
    assert (np.bincount(data.val.fine, minlength=100) == 5).all()
    assert (np.bincount(data.train.fine, minlength=100) == 35).all()
    train_keys = {img.tobytes() for img in data.train.images}
    assert not any(img.tobytes() in train_keys for img in data.val.images)
    again = cifar.load(cifar_dir, val_size=500)
    np.testing.assert_array_equal(data.val.images, again.val.images)


def test_uneven_validation_size_stays_balanced(cifar_dir):
    data = cifar.load(cifar_dir, val_size=250)
    counts = np.bincount(data.val.fine, minlength=100)
    assert len(data.val) == 250 and set(counts) == {2, 3}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "meta").unlink(), "no file 'meta'"),
        (lambda folder: (folder / "train").write_bytes(b"not a pickle"), "not a CIFAR-100 pickle"),
        (lambda folder: (folder / "test").write_bytes(pickle.dumps([1, 2])), "holds list"),
        (lambda folder: _edit(folder / "train", b"fine_labels", None), "missing b'fine_labels'"),
        (lambda folder: _edit(folder / "test", b"data", np.zeros((500, 3072), "f4")), "uint8"),
        (lambda folder: _edit(folder / "meta", b"fine_label_names", [b"x"]), "100 names"),
    ],
)
def test_broken_datasets_get_clear_errors(cifar_dir, tmp_path, damage, message):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes((cifar_dir / name).read_bytes())
    damage(folder)
    with pytest.raises(cifar.DataError, match=message):
        cifar.load(folder, val_size=500)


class RunsCode:
    """What a malicious pickle holds: unpickling it calls a function of its choice."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(cifar_dir, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        # Protocol 2, as Python 2 and old tools wrote: still read.
        content = pickle.loads((cifar_dir / name).read_bytes())
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = pickle.loads((cifar_dir / "meta").read_bytes())
    (folder / "meta").write_bytes(pickle.dumps(meta))
    assert len(cifar.load(folder, val_size=500).train) == 3500

    marker = tmp_path / "ran"
    (folder / "meta").write_bytes(pickle.dumps({**meta, b"extra": RunsCode(marker)}))
    with pytest.raises(cifar.DataError, match=r"names posix\.system.*could run code"):
        cifar.load(folder, val_size=500)
    assert not marker.exists()


def test_missing_path_and_non_archive(tmp_path):
    with pytest.raises(cifar.DataError, match="does not exist"):
        cifar.load(tmp_path / "nowhere")
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(cifar.DataError, match="readable archive"):
        cifar.load(tmp_path / "x.tar.gz")


@pytest.fixture
def archive_server(cifar_tarball, monkeypatch):
    """The archive served over loopback HTTP, with the module pointed at it."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(cifar_tarball.parent)
    )
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cifar, "URL", f"http://127.0.0.1:{server.server_port}/{cifar_tarball.name}")
    yield cifar_tarball
    server.shutdown()


def test_download_is_verified_then_cached(archive_server, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive_server.read_bytes()).hexdigest())
    data = cifar.load(cache_dir=tmp_path, val_size=500)
    assert len(data.test) == 500
    assert (tmp_path / cifar.ARCHIVE_NAME).read_bytes() == archive_server.read_bytes()
    monkeypatch.setattr(cifar, "URL", "http://127.0.0.1:9/unreachable")  # cached: no network
    assert len(cifar.load(cache_dir=tmp_path, val_size=500).train) == 3500


def test_download_with_wrong_md5_is_never_unpickled(archive_server, tmp_path, monkeypatch):
    monkeypatch.setattr(
        cifar, "restricted_load", lambda *a, **k: pytest.fail("unpickled unverified data")
    )
    with pytest.raises(cifar.DataError, match="md5"):
        cifar.load(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_cached_archive_with_wrong_md5_is_refused(tmp_path):
    (tmp_path / cifar.ARCHIVE_NAME).write_bytes(b"tampered")
    with pytest.raises(cifar.DataError, match="official md5"):
        cifar.load(cache_dir=tmp_path)


def test_no_network_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "URL", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(cifar.DataError, match="--data-dir"):
        cifar.load(cache_dir=tmp_path)


def _edit(path, key, value):
    content = pickle.loads(path.read_bytes())
    if value is None:
        del content[key]
    else:
        content[key] = value
    path.write_bytes(pickle.dumps(content))
