"""Atomic writes: a file appears complete or not at all."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

from deploy_kit.errors import ConfigError, OutputExistsError


def check_writable(path: Path, force: bool, kind: str = "file") -> None:
    """Before any work: `path` (a "file" or a "dir") can be written — nothing on the way is a
    file, the nearest existing folder is writable — and does not exist unless the user said
    --force. Cheap, so every command calls it for every output before it trains or converts."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{path} is a folder, not a file; choose another output path")
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"{path} is a file, not a folder; choose another output folder")
        if not force:
            raise OutputExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")
    check_creatable(path)


def check_creatable(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder we may write into."""
    absolute = Path(os.path.abspath(path))
    existing = next((p for p in absolute.parents if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"cannot create {path}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {path}: no permission to write into {existing}; choose another output path")


def _umask_mode(mode: int) -> int:
    """`mode` as a plain open()/mkdir() under the current umask would give it. mkstemp/mkdtemp
    create 0600/0700 for their own safety; kept, an export served by another user (a web server)
    or copied into an app would be unreadable."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path in the same folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path, force: bool = False):
    """Claim the folder `path` before any work, build its content under a temp name beside it
    and swap it into place at the end; a failed build leaves the previous content (or nothing).

    The claim is atomic: `os.mkdir` creates the folder (of two processes only one can), and an
    exclusive `flock` on it is held until the swap, so a second writer into the same folder —
    even with --force — fails at once instead of replacing the first one's work. The lock
    dies with the process: a killed export leaves no stale lock behind."""
    path = Path(path)
    check_writable(path, force, kind="dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    created = _make_claim(path, force)
    fd = _lock_claim(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    done = False
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:
            with suppress(OSError):
                path.rmdir()  # only our own, still empty claim
        os.close(fd)


def _make_claim(path: Path, force: bool) -> bool:
    """mkdir `path`; True when this process created it."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        if not force:
            raise OutputExistsError(f"{path} already exists (or another deploykit process just claimed it); "
                                    "pass --force to overwrite it or choose another --out") from None
        return False


def _lock_claim(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputExistsError(f"{path} is being written by another deploykit process right now; wait for it "
                                "to finish or choose another --out") from None
    return fd


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MAX_JSON_BYTES = 256 << 20  # far above any file deploykit writes; a bigger one is not ours


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the float range")
    return value


def parse_json_text(text: str):
    """Strict JSON: NaN, Infinity and numbers beyond the float range (1e400) are refused, not
    read as nan/inf; nesting too deep for the parser is a ValueError, not a RecursionError."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: Path, error: type[Exception], label: str | None = None, fix: str = ""):
    """Parse a JSON file strictly (`parse_json_text`); an unreadable, oversized or corrupt one
    raises `error` with one line naming it (and the fix)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{label or path}: {path.stat().st_size:,} bytes, more than any deploykit file{fix}")
        return parse_json_text(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{label or path}: not valid JSON ({str(exc)[:200]}){fix}") from None
    except OSError as exc:
        raise error(f"{label or path}: cannot be read ({exc.strerror or exc}){fix}") from None
