"""Datasets: digits splits, CIFAR-10 python batches and ImageFolder trees that the tests write
themselves, the decode cache, and every way a data folder can be unusable."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from deploy_kit.data import CIFAR10_LABELS, Normalization, load_dataset, normalize
from deploy_kit.errors import DataError

# ---- digits ------------------------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_complete():
    ds = load_dataset("digits", seed=0)
    sizes = {n: len(s) for n, s in ds.splits.items()}
    assert sum(sizes.values()) == 1797  # sklearn's digits, all of them
    assert abs(sizes["test"] / 1797 - 0.2) < 0.01 and abs(sizes["val"] / 1797 - 0.1) < 0.01
    assert ds.input_shape == (1, 32, 32) and ds.classes == tuple(str(i) for i in range(10))
    # no image appears in two splits (digits has a handful of duplicate images, compare by index-free hash)
    keys = {n: {s.images[i].tobytes() for i in range(len(s))} for n, s in ds.splits.items()}
    assert len(keys["test"] & keys["train"]) <= 5 and len(keys["val"] & keys["test"]) <= 5
    for split in ds.splits.values():
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert set(np.unique(split.labels)) == set(range(10))  # stratified: every class everywhere


def test_digits_split_is_deterministic_by_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(name).images, b.split(name).images)
        np.testing.assert_array_equal(a.split(name).labels, b.split(name).labels)
    assert not np.array_equal(a.split("test").images, c.split("test").images)
    assert a.norm == b.norm


def test_normalization_travels_with_the_data():
    ds = load_dataset("digits", seed=0)
    x = normalize(ds.split("train").images, ds.norm)
    assert x.dtype == np.float32 and x.shape == (len(ds.split("train")), 1, 32, 32)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert ds.norm.to_dict()["scale"] == pytest.approx(1 / 255)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; expected one of: digits, cifar10:PATH"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10")  # a kind without its PATH
    with pytest.raises(DataError, match="has no split 'holdout'"):
        load_dataset("digits").split("holdout")


# ---- CIFAR-10 ------------------------------------------------------------------------------------

def _cifar_batch(n: int, seed: int) -> dict:
    """One batch in the real format: bytes keys, `data` N×3072 uint8 (planar RGB), `labels` a list."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": f"batch {seed}".encode(), b"labels": labels, b"data": data,
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def write_cifar(root, n: int = 6, protocol: int = 2):
    """A tiny `cifar-10-batches-py` folder: data_batch_1..5 and test_batch, each a real pickle."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(n, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n, 99)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [l.encode() for l in CIFAR10_LABELS]}))
    return folder, batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reads_python_batches(tmp_path, protocol):
    folder, batches = write_cifar(tmp_path, protocol=protocol)
    ds = load_dataset(f"cifar10:{tmp_path}", seed=0)  # the parent folder works too
    assert ds.classes == CIFAR10_LABELS and ds.input_shape == (3, 32, 32)
    assert len(ds.split("train")) + len(ds.split("val")) == 30 and len(ds.split("test")) == 6
    # planar RGB rows → HWC images: pixel (0, 1) of test image 0 has R at 1, G at 1025, B at 2049
    test = ds.split("test")
    row = batches["test_batch"][b"data"][0]
    np.testing.assert_array_equal(test.images[0, 0, 1], [row[1], row[1025], row[2049]])
    np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])
    direct = load_dataset(f"cifar10:{folder}", seed=0)
    np.testing.assert_array_equal(direct.split("test").images, test.images)


def test_cifar10_path_with_tilde(tmp_path, monkeypatch):
    """`--data cifar10:~/x`: the shell does not expand a `~` after the colon, the loader does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_cifar(tmp_path / "data")
    ds = load_dataset("cifar10:~/data", seed=0)
    assert ds.spec == f"cifar10:{tmp_path / 'data'}" and len(ds.split("test")) == 6


def test_cifar10_missing_batch(tmp_path):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset(f"cifar10:{folder}")


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")


def test_cifar10_empty_folder(tmp_path):
    with pytest.raises(DataError, match="missing data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar10_corrupt_batch(tmp_path):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{folder}")


def test_cifar10_wrong_shape(tmp_path):
    folder, _ = write_cifar(tmp_path)
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{folder}")


class _Exploit:
    """Unpickling this would call os.system: a data file must never be able to do that."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar10_pickle_with_a_forbidden_global_is_refused(tmp_path, monkeypatch):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="refusing to load .*system"):
        load_dataset(f"cifar10:{folder}")
    assert not (tmp_path / "PWNED").exists()


# ---- ImageFolder ---------------------------------------------------------------------------------

def _png(path, rgb, size=(32, 32), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb if mode == "RGB" else rgb[0]).save(path)


CLASS_COLORS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}


def write_imagefolder(root, splits=("train", "test"), per_class=4, classes=CLASS_COLORS):
    for split in splits:
        for cls, rgb in classes.items():
            for i in range(per_class):
                _png(root / split / cls / f"{i}.png", tuple(min(255, c + i) for c in rgb))
    return root


def test_imagefolder_reads_classes_and_carves_val(tmp_path):
    write_imagefolder(tmp_path, per_class=10)
    ds = load_dataset(f"imagefolder:{tmp_path}", seed=0)
    assert ds.classes == ("cat", "dog", "emu") and ds.input_shape == (3, 32, 32)
    assert len(ds.split("val")) == 3 and len(ds.split("train")) == 27 and len(ds.split("test")) == 30
    # the label follows the folder: a "dog" image is green
    test = ds.split("test")
    dogs = test.images[test.labels == 1]
    assert (dogs[..., 1] > dogs[..., 0]).all()
    assert np.unique(ds.split("val").labels).tolist() == [0, 1, 2]  # carved per class


def test_imagefolder_uses_val_folder_when_present(tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val", "test"), per_class=3)
    ds = load_dataset(f"imagefolder:{tmp_path}", seed=0)
    assert {n: len(s) for n, s in ds.splits.items()} == {"train": 9, "val": 9, "test": 9}


def test_imagefolder_resizes_to_the_first_image_and_converts_modes(tmp_path):
    write_imagefolder(tmp_path, per_class=2)
    _png(tmp_path / "train" / "cat" / "big.png", (255, 0, 0), size=(64, 48))
    _png(tmp_path / "test" / "dog" / "gray.png", (128,), mode="L")
    from PIL import Image
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "test" / "emu" / "photo.jpg")
    ds = load_dataset(f"imagefolder:{tmp_path}", seed=0)
    assert ds.input_shape == (3, 32, 32)
    assert len(ds.split("test")) == 8


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_imagefolder_empty_folder(tmp_path):
    with pytest.raises(DataError, match="has no train/ folder"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_without_images(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_corrupt_image(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(DataError, match=r"cannot decode .*broken.png"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_class_lists_that_differ(tmp_path):
    write_imagefolder(tmp_path / "a", splits=("train",))
    write_imagefolder(tmp_path / "a", splits=("test",), classes={"cat": (1, 1, 1), "dog": (2, 2, 2)})
    with pytest.raises(DataError, match=r"test/ classes \['cat', 'dog'\] differ from train/ classes"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")


# ---- the cache -----------------------------------------------------------------------------------

def test_decoded_data_is_cached_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(cache))
    root = write_imagefolder(tmp_path / "data", per_class=3)
    first = load_dataset(f"imagefolder:{root}", seed=0)
    entries = list(cache.glob("imagefolder-*.npz"))
    assert len(entries) == 1

    # the second load must come from the cache, not from the images: make decoding impossible
    import deploy_kit.data as data_mod

    def no_decode(*_a, **_k):
        raise AssertionError("decoded again instead of reading the cache")
    monkeypatch.setattr(data_mod, "_imagefolder_splits", no_decode)
    second = load_dataset(f"imagefolder:{root}", seed=0)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(first.split(name).images, second.split(name).images)
        np.testing.assert_array_equal(first.split(name).labels, second.split(name).labels)
    assert second.classes == first.classes and second.norm == first.norm

    # a changed folder is a new cache entry (and is decoded again)
    monkeypatch.undo()
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(cache))
    _png(root / "train" / "cat" / "extra.png", (9, 9, 9))
    third = load_dataset(f"imagefolder:{root}", seed=0)
    assert len(third.split("train")) + len(third.split("val")) == 10
    assert len(list(cache.glob("imagefolder-*.npz"))) == 2


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(cache))
    folder, _ = write_cifar(tmp_path / "data")
    first = load_dataset(f"cifar10:{folder}")
    (entry,) = cache.glob("cifar10-*.npz")
    entry.write_bytes(b"garbage")
    again = load_dataset(f"cifar10:{folder}")
    np.testing.assert_array_equal(first.split("test").images, again.split("test").images)


def test_normalization_is_a_frozen_value():
    norm = Normalization((0.5,), (0.25,))
    with pytest.raises(Exception):
        norm.mean = (0.1,)
    x = normalize(np.full((1, 2, 2, 1), 255, np.uint8), norm)
    assert x.shape == (1, 1, 2, 2) and np.allclose(x, 2.0)
