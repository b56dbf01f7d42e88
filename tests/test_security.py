"""Nothing read from a file chooses code to run: a payload planted in every non-checkpoint load path.

The payload is an object whose ``__reduce__`` makes the unpickler call ``exec``, which writes a
marker file. Each test plants it where a loader reads (CIFAR-10 batches and their meta file,
MNIST idx files, image folders, mask files, feature caches, Inception weights) and asserts the
marker never appears and the error names the file. The first test shows the payload does fire
under a plain ``pickle.load``, so these tests can fail. Checkpoint payloads: tests/test_checkpoint.py.
"""

from __future__ import annotations

import gzip
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sde._io import UnsafeFileError
from sde.data import load_array, load_dataset

from _py2pickle import dumps_py2  # isort: skip  (tests/ helper: CIFAR-10's Python 2 pickle format)

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the planted payload ran"


def _cifar_batch(n: int = 2, extra=None) -> dict:
    batch = {b"batch_label": b"batch", b"labels": [0] * n, b"data": np.zeros((n, 3072), np.uint8), b"filenames": []}
    if extra is not None:
        batch[b"extra"] = extra
    return batch


def _write_cifar(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(dumps_py2(_cifar_batch()))


def test_the_payload_fires_under_plain_pickle(tmp_path):
    path = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(path)))
    assert path.read_text() == "pwned"


# -- CIFAR-10 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("where", ["whole file", "inside the batch dict"])
def test_cifar_batch_payload_is_refused(tmp_path, marker, protocol, where):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    obj = Payload(marker) if where == "whole file" else _cifar_batch(extra=Payload(marker))
    raw = dumps_py2(obj) if protocol == 2 else pickle.dumps(obj, protocol=protocol)  # 2: CIFAR's own format
    (folder / "data_batch_3").write_bytes(raw)
    # protocol 5 writes arrays with numpy._core.numeric._frombuffer, which CIFAR-10's files never hold: refused first
    first = r"numpy\._core\.numeric\._frombuffer" if (protocol, where) == (5, "inside the batch dict") else "exec"
    with pytest.raises(UnsafeFileError, match=rf"data_batch_3.*global (builtins\.|__builtin__\.)?{first}.*refused"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_gz_and_meta_payloads_are_refused(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "test_batch").unlink()
    (folder / "test_batch.gz").write_bytes(gzip.compress(pickle.dumps(Payload(marker))))
    with pytest.raises(UnsafeFileError, match=r"test_batch\.gz.*builtins\.exec"):
        load_dataset("cifar10", root=tmp_path, split="test")
    (folder / "batches.meta").write_bytes(dumps_py2({b"label_names": Payload(marker)}))
    with pytest.raises(UnsafeFileError, match=r"batches\.meta.*__builtin__\.exec"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_object_arrays_and_other_numpy_globals_are_refused(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_1").write_bytes(dumps_py2(_cifar_batch(extra=np.array([1, 2], dtype=object))))
    with pytest.raises(UnsafeFileError, match="dtype.*holds Python objects"):
        load_dataset("cifar10", root=tmp_path)
    # a numpy function other than the array-rebuilding ones is refused by name, never called
    (folder / "data_batch_1").write_bytes(dumps_py2(_cifar_batch(extra=np.load)))
    with pytest.raises(UnsafeFileError, match=r"data_batch_1.*numpy.*load"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_real_format_still_loads(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", root=tmp_path)) == 10


# -- MNIST idx and image folders: parsed, never unpickled ---------------------------------------------
def test_mnist_idx_payload_is_just_a_bad_file(tmp_path, marker):
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]:
        (tmp_path / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*not a 3-d unsigned-byte idx file"):
        load_dataset("mnist", root=tmp_path)


def test_image_folder_payload_is_just_a_bad_image(tmp_path, marker):
    (tmp_path / "a.png").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"cannot read image .*a\.png"):
        load_dataset("image_folder", root=tmp_path)


# -- masks (controllable.py control.mask=<file>) -------------------------------------------------------
def test_npy_mask_payload_is_refused(tmp_path, marker):
    path = tmp_path / "mask.npy"
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match=r"control\.mask.*mask\.npy.*pickled object array"):
        load_array(path, what="control.mask")


def test_pt_mask_payload_is_refused(tmp_path, marker):
    path = tmp_path / "mask.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(UnsafeFileError, match=r"control\.mask.*mask\.pt.*weights_only"):
        load_array(path, what="control.mask")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"control\.mask.*mask\.pt.*not a readable torch file"):
        load_array(path, what="control.mask")


def test_controllable_app_mask_file_payload_is_refused(tmp_path, marker):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import controllable
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    path = tmp_path / "mask.npy"
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    control = OmegaConf.create({"mask": str(path)})
    with pytest.raises(UnsafeFileError, match=r"control\.mask.*mask\.npy"):
        controllable.make_mask(control, (1, 1, 4, 4), torch.Generator(), torch.device("cpu"), torch.float32)


def test_mask_files_still_load(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((4, 4), np.float32))
    torch.save(torch.zeros(4, 4), tmp_path / "m.pt")
    assert load_array(tmp_path / "m.npy").shape == (4, 4) and load_array(tmp_path / "m.pt").shape == (4, 4)
    with pytest.raises(FileNotFoundError, match="control.mask.*nope.npy"):
        load_array(tmp_path / "nope.npy", what="control.mask")


# -- feature caches and extractor weights ------------------------------------------------------------
def test_reference_feature_cache_payload_is_ignored(tmp_path, marker):
    from sde.features.reference import _load_features

    path = tmp_path / "features.npz"
    np.savez(path, features=np.array([Payload(marker)], dtype=object))
    assert _load_features(path) is None  # refused (allow_pickle=False) and recomputed by the caller


def test_feature_stats_payload_is_refused(tmp_path, marker):
    from sde.metrics import FeatureStats

    path = tmp_path / "stats.npz"
    np.savez(path, mean=np.array([Payload(marker)], dtype=object), cov=np.zeros((1, 1)), n=np.int64(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        FeatureStats.load(path)


def test_digits_classifier_cache_payload_is_ignored(tmp_path, marker):
    from sde.features.digits_classifier import _try_load

    path = tmp_path / "digits_classifier.pt"
    torch.save({"version": Payload(marker)}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _try_load(path) is None  # refused by weights_only; the caller retrains
    assert any("ignoring unusable digits classifier cache" in str(w.message) for w in caught)


def test_inception_weights_payload_is_refused(tmp_path, marker):
    from sde.features import load_fid_inception

    path = tmp_path / "pt_inception.pth"
    torch.save({"w": Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"Inception weights.*pt_inception\.pth"):
        load_fid_inception(path)
