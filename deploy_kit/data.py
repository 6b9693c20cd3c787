"""Datasets, addressed by one string everywhere (`--data`).

`digits`            the 8×8 handwritten digits scikit-learn ships offline, upsampled to 32×32
`cifar10:PATH`      the standard `cifar-10-batches-py` folder
`imagefolder:PATH`  `train/`, `test/` and optional `val/` folders of class sub-folders

Every dataset is decoded once into uint8 NHWC arrays (cached as .npz) and carries its
normalization, so training, search, export and verify all see the same preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy_kit.errors import ConfigError, DataError

DATASET_KINDS = ("digits", "cifar10:PATH", "imagefolder:PATH")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std applied to images scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N×H×W×C
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    spec: str
    classes: tuple[str, ...]
    splits: dict[str, Split] = field(repr=False)
    norm: Normalization

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W as the models (NCHW) see it."""
        _, h, w, c = self.splits["train"].images.shape
        return (c, h, w)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"dataset {self.spec} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def normalize(images: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 NHWC → float32 NCHW, normalized: the input every model and runtime receives."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_dataset(spec: str, seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """Parse `spec`, decode (or read the cache), split by `seed`, and attach normalization."""
    kind, _, path = spec.partition(":")
    if path:  # the shell leaves `~` alone after "cifar10:", so expand it here
        path = os.path.expanduser(path)
        spec = f"{kind}:{path}"
    if kind == "digits" and not path:
        classes, splits = _digits_splits(seed, val_fraction)
    elif kind == "cifar10" and path:
        classes, splits = _cached(spec, seed, lambda: _cifar10_splits(Path(path)))
    elif kind == "imagefolder" and path:
        classes, splits = _cached(spec, seed, lambda: _imagefolder_splits(Path(path)))
    else:
        raise DataError(f"unknown dataset {spec!r}; expected one of: {', '.join(DATASET_KINDS)}")
    if "val" not in splits:
        splits["train"], splits["val"] = _carve(splits["train"], val_fraction, seed)
    return Dataset(spec, tuple(classes), splits, _normalization(splits["train"].images))


def _normalization(images: np.ndarray) -> Normalization:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    return Normalization(tuple(round(float(m), 4) for m in mean), tuple(round(float(max(s, 1e-3)), 4) for s in std))


def _stratified_order(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified split of `split` into (rest, carved) with `fraction` of each class carved."""
    take, keep = [], []
    for idx in _stratified_order(split.labels, seed):
        n = int(round(len(idx) * fraction))
        take.append(idx[:n])
        keep.append(idx[n:])
    keep_idx, take_idx = np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))
    return (Split(split.images[keep_idx], split.labels[keep_idx]), Split(split.images[take_idx], split.labels[take_idx]))


def _digits_splits(seed: int, val_fraction: float) -> tuple[list[str], dict[str, Split]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = (bunch.images * (255.0 / 16.0)).astype(np.float32)  # 0..16 → 0..255
    images = _upsample(small, 32).round().clip(0, 255).astype(np.uint8)[..., None]
    full = Split(images, bunch.target.astype(np.int64))
    rest, test = _carve(full, 0.2, seed)
    train, val = _carve(rest, val_fraction / 0.8, seed + 1)
    return [str(i) for i in range(10)], {"train": train, "val": val, "test": test}


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images)[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


# ---- cache ---------------------------------------------------------------------------------

def _cache_dir() -> Path:
    """$DEPLOYKIT_CACHE (default ~/.cache/deploykit); checked before any decoding, so a cache path
    that cannot be a folder fails at once rather than after minutes of decoding."""
    from deploy_kit.fsutil import check_creatable

    path = Path(os.environ.get("DEPLOYKIT_CACHE") or Path.home() / ".cache" / "deploykit")
    if path.exists() and not path.is_dir():
        raise DataError(f"DEPLOYKIT_CACHE={path} is a file, not a folder; point it at a folder (or unset it)")
    try:
        check_creatable(path / "x")
    except ConfigError as exc:  # a file on the way, or no permission
        raise DataError(f"DEPLOYKIT_CACHE={path}: {exc}") from None
    return path


def _fingerprint(root: Path) -> str:
    """Paths, sizes and mtimes of every file: a changed folder gets a new cache entry."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            digest.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _cached(spec: str, seed: int, decode) -> tuple[list[str], dict[str, Split]]:
    root = Path(spec.partition(":")[2])
    if not root.is_dir():
        raise DataError(f"{spec}: folder {root} does not exist; pass the folder that holds the dataset")
    cache = _cache_dir() / f"{spec.partition(':')[0]}-{_fingerprint(root)}.npz"  # checked before decoding
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                splits = {k[:-7]: Split(z[k], z[k[:-7] + "_labels"]) for k in z.files if k.endswith("_images")}
                return [str(c) for c in z["classes"]], splits
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is rebuilt, never trusted
    classes, splits = decode()
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"classes": np.asarray(classes)}
    for name, s in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = s.images, s.labels
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return classes, splits


# ---- CIFAR-10 --------------------------------------------------------------------------------

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow plain containers and numpy arrays, nothing callable."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        # pickle protocol 5 (Python 3.14's default) stores arrays as raw buffers: a re-saved batch
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> Split:
    if not path.is_file():
        raise DataError(f"cifar10: missing {path.name} in {path.parent}; expected data_batch_1..5 and test_batch")
    try:
        d = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except Exception as exc:  # any decoding failure means the file is not a CIFAR batch
        raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if len(images) != len(labels):
        raise DataError(f"cifar10: {path} holds {len(images)} images but {len(labels)} labels")
    return Split(np.ascontiguousarray(images), labels)


def _cifar10_splits(root: Path) -> tuple[list[str], dict[str, Split]]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test = _read_cifar_batch(root / "test_batch")
    merged = Split(np.concatenate([b.images for b in train]), np.concatenate([b.labels for b in train]))
    return list(CIFAR10_LABELS), {"train": merged, "test": test}


# ---- ImageFolder -----------------------------------------------------------------------------

def _class_dirs(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: {split_dir} has no class sub-folders; expected {split_dir}/<class>/<image>.png")
    return classes


def _to_rgb(im) -> np.ndarray:
    """Any PIL image → uint8 RGB. PIL's own convert("RGB") clips 16-bit and 32-bit integer
    grayscale ("I;16", "I") at 255 — a 16-bit PNG came out almost white — so those are scaled
    from their full range (65535 → 255) first."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8), mode="L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_image(p: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            if size is not None and im.size != size:
                return np.asarray(Image.fromarray(_to_rgb(im)).resize(size, Image.BILINEAR), dtype=np.uint8)
            return _to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise DataError(f"imagefolder: {p} is too large to decode safely ({exc}); resize it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"imagefolder: cannot decode {p} ({exc}); remove or replace the file") from None


def _read_image_split(split_dir: Path, classes: list[str], size: tuple[int, int] | None) -> Split:
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files and split_dir.name == "train":
            raise DataError(f"imagefolder: class folder {split_dir / cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "every class needs training images — add some or remove the folder")
        for p in files:
            images.append(_read_image(p, size))
            labels.append(label)
            size = size or images[0].shape[1::-1]
    if not images:
        raise DataError(f"imagefolder: {split_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def _imagefolder_splits(root: Path) -> tuple[list[str], dict[str, Split]]:
    names = [n for n in ("train", "val", "test") if (root / n).is_dir()]
    for required in ("train", "test"):
        if required not in names:
            raise DataError(f"imagefolder: {root} has no {required}/ folder; expected train/, test/ and optional val/")
    classes = _class_dirs(root / "train")
    for name in names[1:]:
        other = _class_dirs(root / name)
        if other != classes:
            raise DataError(f"imagefolder: {name}/ classes {other} differ from train/ classes {classes}; "
                            "every split needs the same class folders")
    splits, size = {}, None
    for name in names:
        splits[name] = _read_image_split(root / name, classes, size)
        size = splits[name].images.shape[2:0:-1]
    return classes, splits
