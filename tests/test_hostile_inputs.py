"""Hostile input and tampering (issue 14), as one table of cases over every command.

Each case copies one tiny LeNet5/digits run (trained, searched and exported once per module),
breaks something or passes a bad option, runs the command in-process and asserts the promise:
exit 2 (1 where a verification ran), exactly one `error: …` line on stderr, no traceback, and
no file created or changed anywhere under the case's folder (tree + sha256 before and after).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.fsutil import sha256_file
from exporters.manifest import content_digest, seal

RUN, TMP = "{run}", "{tmp}"


# ----------------------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def base_run(lenet_teacher, tmp_path_factory) -> Path:
    """A run folder: the session teacher, a 3-evaluation random search (result.json +
    search_log.jsonl) and its exports for every target. Read-only: cases work on copies."""
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.search import RewardConfig, SearchConfig, run_search

    run = tmp_path_factory.mktemp("hostile") / "run"
    run.mkdir()
    for f in lenet_teacher.iterdir():
        shutil.copy(f, run / f.name)
    cfg = SearchConfig(method="random", episodes=3, top_n=1, state_images=64, reward=RewardConfig(images=32))
    run_search(run, cfg, out=run / "result.json")
    export(ExportConfig(result_path=run / "result.json", targets=("all",), calibration_images=32))
    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its sha256 (folders and links marked): the whole state."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = sha256_file(p)
    return out


# ----------------------------------------------------------------------------- edits

def edit_json(rel: str, change: Callable[[dict], object], reseal: bool = False) -> Callable[[Path], None]:
    """Change a JSON file of the run in place; `reseal`: recompute the manifest's content digest
    afterwards (a tamperer who knows the format), so the schema, not the digest, must catch it."""
    def prepare(run: Path) -> None:
        path = run / rel
        obj = json.loads(path.read_text())
        replaced = change(obj)
        obj = obj if replaced is None else replaced
        if reseal and isinstance(obj, dict):
            obj["content_sha256"] = content_digest(obj)
        path.write_text(json.dumps(obj))
    return prepare


def write_text(rel: str, text: str) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        (run / rel).write_text(text)
    return prepare


def flip_byte(rel: str) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        data = bytearray((run / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (run / rel).write_bytes(bytes(data))
    return prepare


def remove(rel: str) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        (run / rel).unlink()
    return prepare


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(run: Path) -> None:
        for step in steps:
            step(run)
    return prepare


def setitem(keys: tuple, value):
    """obj[k1][k2]… = value (None: delete the last key)."""
    def change(obj):
        for k in keys[:-1]:
            obj = obj[k]
        if value is None:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = value
    return change


DEEP = "[" * 200_000 + "]" * 200_000


def deep_object(key: str) -> str:
    return json.dumps({key: "X"}).replace('"X"', DEEP)


def first_layer(obj) -> dict:
    return next(iter(obj["layers"].values()))


def set_code(code_key: str, value):
    def change(obj):
        first_layer(obj)[code_key] = value
    return change


def raw_code(text: str) -> Callable[[Path], None]:
    """result.json's first t1_code as raw JSON text (NaN, 1e400 …: not expressible via json.dumps)."""
    def prepare(run: Path) -> None:
        obj = json.loads((run / "result.json").read_text())
        first_layer(obj)["t1_code"] = "@@CODE@@"
        (run / "result.json").write_text(json.dumps(obj).replace('"@@CODE@@"', text))
    return prepare


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width × height (a decompression bomb's header) and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def imagefolder(size: int = 32, empty: str | None = None, bomb: bool = False, corrupt: bool = False,
                splits=("train", "test"), test_classes=("a", "b")) -> Callable[[Path], None]:
    """tmp/images: train/ and test/ of two classes, two gray PNGs each, with one defect."""
    from PIL import Image

    def prepare(run: Path) -> None:
        root = run.parent / "images"
        for split in splits:
            for cls in (("a", "b") if split == "train" else test_classes):
                folder = root / split / cls
                folder.mkdir(parents=True)
                if cls == empty and split == "train":
                    continue
                for i in range(2):
                    Image.fromarray(np.full((size, size), 40 * i + 10, np.uint8), mode="L").save(folder / f"{i}.png")
        if bomb:
            png_header_only(root / "train" / "a" / "2.png", 20_000, 20_000)
        if corrupt:
            (root / "train" / "a" / "3.png").write_bytes(b"not a png at all")
    return prepare


def outside_artifact(path_value: str) -> Callable[[Path], None]:
    """The first artifact moved to `path_value` with the right sha256, manifest resealed."""
    def prepare(run: Path) -> None:
        outside = run.parent / "outside"
        outside.mkdir(exist_ok=True)
        shutil.copy(run / "exports" / "model.onnx", outside / "model.onnx")
        target = Path(path_value) if path_value.startswith("/") else run / "exports" / path_value
        edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(
            path=path_value, sha256=sha256_file(target), bytes=target.stat().st_size), reseal=True)(run)
    return prepare


def symlink_artifact(run: Path) -> None:
    """An artifact that is a symlink leading out of the exports folder (hashes all consistent)."""
    outside = run.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(run / "exports" / "model.onnx", outside / "model.onnx")
    (run / "exports" / "model.onnx").unlink()
    (run / "exports" / "model.onnx").symlink_to(Path("../../outside/model.onnx"))


def break_lut_and_reseal(run: Path) -> None:
    """conv2's LUT threshold moved by 120 codes in model.onnx, every hash recorded again (a
    buggy exporter): the hash checks pass, so the verification itself must fail (exit 1)."""
    import onnx

    exports = run / "exports"
    manifest = json.loads((exports / "manifest.json").read_text())
    scale = manifest["layers"]["conv2"]["scale"]
    proto = onnx.load(str(exports / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == "conv2/lut/tmax")
    value = onnx.numpy_helper.to_array(init) + np.float32(120 * scale)
    init.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), init.name))
    onnx.save(proto, str(exports / "model.onnx"))
    for a in manifest["artifacts"]:
        if a["path"] == "model.onnx":
            a["sha256"], a["bytes"] = sha256_file(exports / "model.onnx"), (exports / "model.onnx").stat().st_size
    (exports / "manifest.json").write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "content_sha256"},
                                                          exports)))


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str = ""  # a piece of the one error line
    prepare: Callable[[Path], None] | None = None
    code: int = 2
    env: dict = field(default_factory=dict)
    may_change: tuple[str, ...] = ()  # paths (relative to the case folder) the command may write


def case(id_, *args, expect="", prepare=None, code=2, env=None, may_change=()) -> Case:
    return Case(id_, tuple(args), expect, prepare, code, env or {}, may_change)


def option_cases(command: str, base: tuple[str, ...], bad: list[tuple[str, str]]) -> list[Case]:
    """One case per (option, value): a value out of range or of the wrong type."""
    return [case(f"{command} {opt} {val}", command, *base, opt, val, expect=opt) for opt, val in bad]


TRAIN = ("--out", f"{TMP}/new", "--epochs", "1", "--qat-epochs", "1", "--max-train", "50")
TRAIN_BAD = [("--seed", "-1"), ("--seed", "1180591620717411303424"), ("--seed", "abc"), ("--lr", "nan"),
             ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "1e400"), ("--width", "0"), ("--width", "nan"),
             ("--width", "-1"), ("--width", "5"), ("--epochs", "-1"), ("--epochs", "1.5"), ("--qat-epochs", "0"),
             ("--batch-size", "0"), ("--max-train", "0"), ("--max-train", "-5"), ("--crop", "99"),
             ("--threads", "0"), ("--model", "resnet9000"), ("--backend", "cuda"), ("--device", "tpu"),
             ("--optimizer", "lbfgs"), ("--weight-decay", "nan"), ("--weight-decay", "-1"), ("--weight-decay", "1")]

SEARCH = ("--teacher", RUN, "--out", f"{TMP}/r.json", "--episodes", "2")
SEARCH_BAD = [("--seed", "-1"), ("--seed", "99999999999999999999999"), ("--episodes", "0"), ("--episodes", "-3"),
              ("--top-n", "0"), ("--max-acc-drop", "nan"), ("--max-acc-drop", "-1"), ("--temperature", "0"),
              ("--temperature", "nan"), ("--at-weight", "inf"), ("--at-weight", "-1"), ("--reward-images", "0"),
              ("--tmax-percentile", "101"), ("--tmax-percentile", "nan"), ("--tmax-offset", "-1"),
              ("--tmax-fixed", "0"), ("--tmax-fixed", "300"), ("--method", "annealing"), ("--device", "tpu")]

FINETUNE = ("--config", f"{RUN}/result.json", "--out", f"{TMP}/ft")
FINETUNE_BAD = [("--epochs", "0"), ("--lr", "nan"), ("--lr", "0"), ("--batch-size", "0"), ("--temperature", "0"),
                ("--temperature", "inf"), ("--kd-weight", "-1"), ("--ce-weight", "nan"), ("--at-weight", "-1"),
                ("--seed", "-1"), ("--max-train", "0"), ("--threads", "0"), ("--ema", "nan"), ("--ema", "1"),
                ("--select", "median")]

VERIFY = ("--exports", f"{RUN}/exports")
VERIFY_BAD = [("--max-drop", "nan"), ("--max-drop", "-1"), ("--min-agreement", "101"), ("--min-agreement", "nan"),
              ("--threads", "0"), ("--split", "holdout")]

BENCH = ("--exports", f"{RUN}/exports")
BENCH_BAD = [("--seed", "-1"), ("--warmup", "-1"), ("--repeats", "0"), ("--repeats32", "0"), ("--rounds", "0"),
             ("--threads", "0")]

DEMO = ("--out", f"{TMP}/demo")
DEMO_BAD = [("--seed", "-1"), ("--episodes", "0"), ("--width", "nan"), ("--epochs", "-1"), ("--qat-epochs", "1e9"),
            ("--bench-repeats", "0"), ("--lut-form", "gather"), ("--finetune-epochs", "-1"), ("--model", "x"),
            ("--finetune-ema", "nan")]

EXPORT = ("--config", f"{RUN}/result.json", "--out", f"{TMP}/exp")
PRUNE = ("--teacher", RUN, "--out", f"{TMP}/pruned", "--budget", "macs=0.5", "--episodes", "2", "--kd-epochs", "1",
         "--qat-epochs", "1")
PRUNE_BAD = [("--budget", "macs=1.5"), ("--budget", "macs=0"), ("--budget", "latency=-0.5"), ("--budget", "macs=nan"),
             ("--budget", "flops=0.5"), ("--budget", "macs"), ("--runtime", "tflite-gpu"), ("--method", "random"),
             ("--episodes", "0"), ("--seed", "-1"), ("--alpha", "nan"), ("--kd-epochs", "-1"), ("--qat-epochs", "0"),
             ("--kd-temperature", "0"), ("--device", "tpu"), ("--kd-lr", "0"), ("--kd-lr", "nan"), ("--kd-lr", "-1"),
             ("--threads", "0"), ("--threads", "two"), ("--finalists", "-1"), ("--finalist-images", "8"),
             ("--finalist-epochs", "0"), ("--finalists", "six"), ("--latency-margin", "0.5"),
             ("--latency-margin", "-0.01"), ("--latency-margin", "nan"), ("--reward", "accuracy"),
             ("--reward-images", "8"), ("--reward-images", "lots")]

IMPORT = ("--research", f"{TMP}/ckpt.pth", "--model", "lenet5", "--data", "digits", "--out", f"{TMP}/imported")
IMPORT_BAD = [("--model", "resnet9000"), ("--backend", "cuda"), ("--seed", "-1")]


def research_checkpoint(obj) -> Callable[[Path], None]:
    """Writes `obj` with torch.save as the case's --research file (next to run/)."""
    def write(run: Path) -> None:
        import torch

        torch.save(obj() if callable(obj) else obj, run.parent / "ckpt.pth")
    return write


EXPORT_BAD = [("--target", "coreml"), ("--io", "int4"), ("--lut-form", "gather")]

# teacher.json broken: (id, prepare, piece of the error)
TEACHER_BROKEN = [
    ("width-abc", edit_json("teacher.json", setitem(("width",), "abc")), '"width"'),
    ("width-true", edit_json("teacher.json", setitem(("width",), True)), '"width"'),
    ("width-string-number", edit_json("teacher.json", setitem(("width",), "0.5")), '"width"'),
    ("layer-scale-true", edit_json("teacher.json", lambda m: first_layer(m).update(scale=True)), "scale"),
    ("mean-string-number", edit_json("teacher.json", setitem(("normalization", "mean"), ["0.5"])), '"normalization.mean'),
    ("width-nan", write_text("teacher.json", '{"format": "deploykit-teacher/1", "width": NaN}'), "not valid JSON"),
    ("layers-list", edit_json("teacher.json", setitem(("layers",), [1])), '"layers"'),
    ("classes-int", edit_json("teacher.json", setitem(("classes",), 5)), '"classes"'),
    ("input-shape-8x8", edit_json("teacher.json", setitem(("input_shape",), [1, 8, 8])), "8×8"),
    ("input-shape-2d", edit_json("teacher.json", setitem(("input_shape",), [32, 32])), "input_shape"),
    ("no-data", edit_json("teacher.json", setitem(("data",), None)), 'lacks data'),
    ("no-seed", edit_json("teacher.json", setitem(("seed",), None)), 'lacks seed'),
    ("seed-negative", edit_json("teacher.json", setitem(("seed",), -4)), '"seed"'),
    ("weights-escape", edit_json("teacher.json", setitem(("weights",), "../../etc/passwd")), '"weights"'),
    ("weights-absolute", edit_json("teacher.json", setitem(("weights",), "/etc/passwd")), '"weights"'),
    ("weights-sha-short", edit_json("teacher.json", setitem(("weights_sha256",), "abc")), '"weights_sha256"'),
    ("std-zero", edit_json("teacher.json", setitem(("normalization", "std"), [0.0])), '"normalization.std'),
    ("mean-2-channels", edit_json("teacher.json", setitem(("normalization", "mean"), [0.1, 0.2])), "channel"),
    ("layer-scale-negative", edit_json("teacher.json", lambda m: first_layer(m).update(scale=-1.0)), "scale"),
    ("layer-zero-point", edit_json("teacher.json", lambda m: first_layer(m).update(zero_point=999)), "zero_point"),
    ("format", edit_json("teacher.json", setitem(("format",), "other/9")), "deploykit-teacher/1"),
    ("top-level-list", write_text("teacher.json", "[1, 2]"), "deploykit-teacher/1"),
    ("not-json", write_text("teacher.json", "{teacher"), "not valid JSON"),
    ("deep", write_text("teacher.json", DEEP), "not valid JSON"),
    ("deep-inside", write_text("teacher.json", deep_object("model")), "not valid JSON"),
    ("empty", write_text("teacher.json", ""), "not valid JSON"),
    ("binary", lambda run: (run / "teacher.json").write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("weights-changed", flip_byte("teacher.safetensors"), "sha256"),
]

# result.json broken
RESULT_BROKEN = [
    ("code-nan", raw_code("NaN"), "not valid JSON"),
    ("code-1e400", raw_code("1e400"), "not valid JSON"),
    ("code-infinity", raw_code("-Infinity"), "not valid JSON"),
    ("code-string", edit_json("result.json", set_code("t1_code", "3")), "t1_code"),
    ("code-float", edit_json("result.json", set_code("t1_code", 3.5)), "t1_code"),
    ("code-bool", edit_json("result.json", set_code("v1_code", True)), "v1_code"),
    ("code-order", edit_json("result.json", set_code("v1_code", 0)), "t1 < v1"),
    ("code-missing", edit_json("result.json", lambda r: first_layer(r).__delitem__("tmax_code")), "lacks layers."),
    ("code-huge", edit_json("result.json", set_code("tmax_code", 10**30)), "tmax_code"),
    ("code-above-qmax", edit_json("result.json", set_code("tmax_code", 290)), "qmax"),
    ("unknown-layer", edit_json("result.json", lambda r: r["layers"].update(conv99=dict(first_layer(r)))), "conv99"),
    ("model-wrong", edit_json("result.json", setitem(("model",), "vgg16")), "vgg16"),
    ("model-int", edit_json("result.json", setitem(("model",), 7)), '"model"'),
    ("teacher-string", edit_json("result.json", setitem(("teacher",), "teacher.json")), '"teacher"'),
    ("teacher-path-int", edit_json("result.json", setitem(("teacher", "path"), 123)), '"teacher.path"'),
    ("teacher-path-absolute", edit_json("result.json", setitem(("teacher", "path"), "/etc/passwd")), '"teacher.path"'),
    ("layers-empty", edit_json("result.json", setitem(("layers",), {})), '"layers"'),
    ("layers-list", edit_json("result.json", setitem(("layers",), [1])), '"layers"'),
    ("student-string", edit_json("result.json", setitem(("student",), "student.json")), '"student"'),
    ("student-escape", edit_json("result.json", setitem(("student",), {"path": "../../x/student.json",
                                                                        "sha256": "0" * 64})), '"student.path"'),
    ("schema", edit_json("result.json", setitem(("schema",), "deploykit-result/9")), "schema"),
    ("top-level-list", write_text("result.json", "[1, 2]"), "JSON object"),
    ("not-json", write_text("result.json", '{"model": '), "not valid JSON"),
    ("deep", write_text("result.json", DEEP), "not valid JSON"),
    ("deep-inside", write_text("result.json", deep_object("layers")), "not valid JSON"),
]

# manifest.json broken; `reseal` ones have a matching content digest, so the schema must refuse them
MANIFEST_BROKEN = [
    ("bytes-abc", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(bytes="abc")), "content_sha256"),
    ("bytes-abc-resealed", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(bytes="abc"), True),
     '"artifacts[0].bytes"'),
    ("artifacts-ints-resealed", edit_json("exports/manifest.json", setitem(("artifacts",), [1]), True), '"artifacts[0]'),
    ("artifacts-empty-resealed", edit_json("exports/manifest.json", setitem(("artifacts",), []), True), '"artifacts"'),
    ("path-int-resealed", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(path=7), True),
     '"artifacts[0].path"'),
    ("sha-short-resealed", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(sha256="ab"), True),
     '"artifacts[0].sha256"'),
    ("variant-resealed", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(variant="x"), True),
     '"artifacts[0].variant"'),
    ("target-unknown-resealed", edit_json("exports/manifest.json", lambda m: m["artifacts"][0].update(target="coreml"),
                                          True), "coreml"),
    ("outside-relative", outside_artifact("../../outside/model.onnx"), '"artifacts[0].path"'),
    ("outside-absolute", outside_artifact("/etc/passwd"), '"artifacts[0].path"'),
    ("outside-symlink", symlink_artifact, "leads outside"),
    ("files-escape-resealed", edit_json("exports/manifest.json", lambda m: m["files"][0].update(path="../teacher.json"),
                                        True), '"files[0].path"'),
    ("teacher-path-passwd-resealed", edit_json("exports/manifest.json", setitem(("teacher", "path"),
                                                                                "../../../../../../etc/passwd"), True),
     "teacher.path"),
    ("result-path-absolute-resealed", edit_json("exports/manifest.json", setitem(("result", "path"), "/etc/passwd"),
                                                True), '"result.path"'),
    ("seed-string-resealed", edit_json("exports/manifest.json", setitem(("seed",), "zero"), True), '"seed"'),
    ("layer-code-resealed", edit_json("exports/manifest.json", lambda m: first_layer(m).update(
        t1_code=first_layer(m)["t1_code"] + 1), True), "LUT codes differ"),
    ("no-digest", edit_json("exports/manifest.json", setitem(("content_sha256",), None)), "content_sha256"),
    ("schema", edit_json("exports/manifest.json", setitem(("schema",), "deploykit-manifest/0")), "expected schema"),
    ("top-level-list", write_text("exports/manifest.json", "[1, 2]"), "expected schema"),
    ("not-json", write_text("exports/manifest.json", "{"), "not valid JSON"),
    ("deep", write_text("exports/manifest.json", DEEP), "not valid JSON"),
    ("missing", remove("exports/manifest.json"), "no manifest"),
]

# the 14 one-byte tampers: each must fail the hash checks before anything runs
TAMPERS = [
    ("model.onnx", flip_byte("exports/model.onnx"), "model.onnx: sha256"),
    ("model.ort", flip_byte("exports/model.ort"), "model.ort: sha256"),
    ("model_int8.tflite", flip_byte("exports/model_int8.tflite"), "model_int8.tflite: sha256"),
    ("relu-model.onnx", flip_byte("exports/relu/model.onnx"), "relu/model.onnx: sha256"),
    ("relu-model.ort", flip_byte("exports/relu/model.ort"), "relu/model.ort: sha256"),
    ("relu-model_int8.tflite", flip_byte("exports/relu/model_int8.tflite"), "relu/model_int8.tflite: sha256"),
    ("required_operators.config", flip_byte("exports/required_operators.config"), "required_operators.config: sha256"),
    ("relu-required_operators.config", flip_byte("exports/relu/required_operators.config"),
     "relu/required_operators.config: sha256"),
    ("manifest-lut-code", edit_json("exports/manifest.json", lambda m: first_layer(m).update(
        t1_code=first_layer(m)["t1_code"] + 1)), "content_sha256"),
    ("manifest-mean-digit", edit_json("exports/manifest.json", lambda m: m["preprocessing"].update(
        mean=[round(m["preprocessing"]["mean"][0] + 0.0001, 6)])), "content_sha256"),
    ("result-invalid-json", lambda run: (run / "result.json").write_text((run / "result.json").read_text()[:-3]),
     "result.json: missing or changed"),
    ("result-code", edit_json("result.json", lambda r: first_layer(r).update(tmax_code=first_layer(r)["tmax_code"] + 1)),
     "result.json: missing or changed"),
    ("teacher-normalization-digit", edit_json("teacher.json", lambda t: t["normalization"].update(
        std=[round(t["normalization"]["std"][0] + 0.0001, 6)])), "teacher.json: missing or changed"),
    ("teacher-weights-byte", flip_byte("teacher.safetensors"), "sha256"),
]


def build_cases() -> list[Case]:
    cases: list[Case] = []
    cases += option_cases("train", TRAIN, TRAIN_BAD)
    cases += option_cases("search", SEARCH, SEARCH_BAD)
    cases += option_cases("finetune", FINETUNE, FINETUNE_BAD)
    cases += option_cases("verify", VERIFY, VERIFY_BAD)
    cases += option_cases("bench", BENCH, BENCH_BAD)
    cases += option_cases("demo", DEMO, DEMO_BAD)
    cases += option_cases("export", EXPORT, EXPORT_BAD)
    cases += option_cases("prune", PRUNE, PRUNE_BAD)
    cases += option_cases("import", IMPORT, IMPORT_BAD)
    cases += [
        # outputs: checked (and claimed) before any work
        case("train out under a file", "train", "--out", f"{TMP}/afile/sub", *TRAIN[2:], expect="is a file"),
        case("train out is a file", "train", "--out", f"{TMP}/afile", *TRAIN[2:], expect="is a file"),
        case("train over a teacher", "train", "--out", RUN, *TRAIN[2:], expect="already exists"),
        case("train data unknown", "train", *TRAIN, "--data", "mnist", expect="mnist"),
        case("train data missing folder", "train", *TRAIN, "--data", f"imagefolder:{TMP}/nothing", expect="does not exist"),
        case("train cifar missing folder", "train", *TRAIN, "--data", f"cifar10:{TMP}/nothing", expect="does not exist"),
        case("train cache is a file", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images", prepare=imagefolder(),
             env={"DEPLOYKIT_CACHE": f"{TMP}/afile"}, expect="DEPLOYKIT_CACHE"),
        case("train cache under a file", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images", prepare=imagefolder(),
             env={"DEPLOYKIT_CACHE": f"{TMP}/afile/cache"}, expect="DEPLOYKIT_CACHE"),
        case("train empty class", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images", prepare=imagefolder(empty="b"),
             expect="holds no images"),
        case("train images 4x4", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images", prepare=imagefolder(size=4),
             expect="4×4"),
        case("train decompression bomb", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images",
             prepare=imagefolder(bomb=True), expect="too large"),
        case("train corrupt image", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images",
             prepare=imagefolder(corrupt=True), expect="cannot decode"),
        case("train no test split", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images",
             prepare=imagefolder(splits=("train",)), expect="no test/"),
        case("train classes differ", "train", *TRAIN, "--data", f"imagefolder:{TMP}/images",
             prepare=imagefolder(test_classes=("a", "c")), expect="differ"),
        case("search out under teacher.json", "search", "--teacher", RUN, "--out", f"{RUN}/teacher.json/r.json",
             expect="is a file"),
        case("search out is a folder", "search", "--teacher", RUN, "--out", RUN, expect="is a folder"),
        case("search over result.json", "search", "--teacher", RUN, "--method", "random", "--out",
             f"{RUN}/result.json", expect="already exists"),
        case("search over a log", "search", "--teacher", RUN, "--method", "random", "--out", f"{RUN}/random.json",
             prepare=write_text("search_log.random.jsonl", "{}\n"), expect="search_log.random.jsonl already exists"),
        case("search teacher missing", "search", "--teacher", f"{TMP}/nothing", expect="no teacher"),
        case("search unknown layer", "search", *SEARCH, "--layers", "conv9", expect="conv9"),
        case("search from result without student", "search", *SEARCH, "--from-student", f"{RUN}/result.json",
             expect="names no fine-tuned student"),
        case("finetune out under a file", "finetune", "--config", f"{RUN}/result.json", "--out", f"{TMP}/afile/sub",
             expect="is a file"),
        case("finetune out is a file", "finetune", "--config", f"{RUN}/result.json", "--out", f"{TMP}/afile",
             expect="is a file"),
        case("finetune config missing", "finetune", "--config", f"{TMP}/nothing.json", expect="no such file"),
        case("export out exists", "export", "--config", f"{RUN}/result.json", expect="already exists"),
        case("export out under a file", "export", "--config", f"{RUN}/result.json", "--out", f"{TMP}/afile/sub",
             expect="is a file"),
        case("export out is a file", "export", "--config", f"{RUN}/result.json", "--out", f"{TMP}/afile", "--force",
             expect="is a file"),
        case("export out holds the inputs", "export", "--config", f"{RUN}/result.json", "--out", RUN, "--force",
             expect="an input of this export"),
        case("export config missing", "export", "--config", f"{TMP}/nothing.json", expect="no such file"),
        case("export config is a folder", "export", "--config", RUN, expect="no such file"),
        case("export teacher missing", "export", *EXPORT, "--teacher", f"{TMP}/nothing", expect="no teacher"),
        case("verify exports missing", "verify", "--exports", f"{TMP}/nothing", expect="no manifest"),
        case("verify exports is a file", "verify", "--exports", f"{TMP}/afile", expect="no manifest"),
        case("verify data unknown", "verify", *VERIFY, "--data", "mnist", expect="mnist"),
        case("bench exports missing", "bench", "--exports", f"{TMP}/nothing", expect="no manifest"),
        case("report out exists", "report", RUN, "--out", f"{RUN}/result.json", expect="already exists"),
        case("report out under a file", "report", RUN, "--out", f"{RUN}/teacher.json/r.html", expect="is a file"),
        case("report out is a folder", "report", RUN, "--out", RUN, expect="is a folder"),
        case("report run missing", "report", f"{TMP}/nothing", expect="no such run folder"),
        case("report verify.json list", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("exports/verify.json", "[1, 2]"), expect="verify.json"),
        case("report verify.json types", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("exports/verify.json", '{"passed": "yes", "data": 1}'), expect='"passed"'),
        case("report verify.json rows", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("exports/verify.json", '{"passed": true, "data": "d", "split": "test", "images": 3, '
                                                      '"rows": [7]}'), expect='"rows[0]"'),
        case("report bench.json rows", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("exports/bench.json", '{"rows": [{"runtime": "x", "artifact": "y", "bytes": "z", '
                                                     '"latency_ms_p50": 1}]}'), expect='"rows[0].bytes"'),
        case("report bench.json deep", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("exports/bench.json", DEEP), expect="not valid JSON"),
        case("report log garbage line", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=lambda run: (run / "search_log.jsonl").write_text("garbage\n"), expect="line 1"),
        case("report log nan", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("search_log.jsonl", '{"evaluation": 1, "best_reward": NaN}\n'), expect="line 1"),
        case("report log list line", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("search_log.jsonl", "[1]\n"), expect="line 1"),
        case("report log wrong type", "report", RUN, "--out", f"{TMP}/r.html",
             prepare=write_text("search_log.jsonl", '{"evaluation": "one", "best_reward": 1}\n'), expect='"evaluation"'),
        case("demo out under a file", "demo", "--out", f"{TMP}/afile/sub", expect="is a file"),
        case("demo out is a file", "demo", "--out", f"{TMP}/afile", expect="is a file"),
        case("demo over a run", "demo", "--out", RUN, expect="already holds a run"),
        case("demo data unknown", "demo", *DEMO, "--data", "mnist", expect="mnist"),
        # prune and import: their inputs and outputs, refused before any work
        case("prune over a teacher", "prune", "--teacher", RUN, "--out", RUN, *PRUNE[4:], expect="exists"),
        case("prune out under a file", "prune", "--teacher", RUN, "--out", f"{TMP}/afile/sub", *PRUNE[4:],
             expect="is a file"),
        case("prune teacher missing", "prune", "--teacher", f"{TMP}/nothing", *PRUNE[2:], expect="nothing"),
        case("import checkpoint missing", "import", *IMPORT, expect="ckpt.pth"),
        case("import corrupt checkpoint", "import", *IMPORT,
             prepare=lambda run: (run.parent / "ckpt.pth").write_bytes(b"\x80\x02garbage" * 10), expect="ckpt.pth"),
        case("import a pickled module", "import", *IMPORT, prepare=research_checkpoint(lambda: __import__("torch").nn.Linear(2, 2)),
             expect="ckpt.pth"),
        case("import another architecture", "import", *IMPORT,
             prepare=research_checkpoint(lambda: {"conv9.weight": __import__("torch").zeros(3, 3)}), expect="layer conv1"),
        case("import data unknown", "import", *IMPORT, "--data", "mnist",
             prepare=research_checkpoint(lambda: {"conv9.weight": __import__("torch").zeros(3, 3)}), expect="mnist"),
        case("import a list", "import", *IMPORT, prepare=research_checkpoint([1, 2, 3]), expect="ckpt.pth"),
        case("import over a teacher", "import", *IMPORT[:-1], RUN,
             prepare=research_checkpoint(lambda: {"conv9.weight": __import__("torch").zeros(3, 3)}), expect="exists"),
        case("verify runs and fails", "verify", *VERIFY, "--localize", prepare=break_lut_and_reseal, code=1,
             expect="verification failed", may_change=("run/exports/verify.json",)),
    ]
    for name, prepare, expect in TEACHER_BROKEN:
        cases.append(case(f"search teacher.json {name}", *("search", *SEARCH), prepare=prepare, expect=expect))
        cases.append(case(f"export teacher.json {name}", *("export", *EXPORT), prepare=prepare, expect=expect))
    for name, prepare, expect in RESULT_BROKEN:
        cases.append(case(f"export result.json {name}", *("export", *EXPORT), prepare=prepare, expect=expect))
        cases.append(case(f"finetune result.json {name}", *("finetune", *FINETUNE), prepare=prepare, expect=expect))
        cases.append(case(f"report result.json {name}", "report", RUN, "--out", f"{TMP}/r.html", prepare=prepare,
                          expect=expect))
    for name, prepare, expect in MANIFEST_BROKEN:
        cases.append(case(f"verify manifest {name}", *("verify", *VERIFY), prepare=prepare, expect=expect))
        cases.append(case(f"bench manifest {name}", *("bench", *BENCH), prepare=prepare, expect=expect))
    for name, prepare, expect in TAMPERS:
        cases.append(case(f"verify tamper {name}", *("verify", *VERIFY), prepare=prepare, expect=expect))
        cases.append(case(f"bench tamper {name}", *("bench", *BENCH), prepare=prepare, expect=expect))
    return cases


CASES = build_cases()
# Cases that need a fine-tuned student or a check this table does not exercise stay in their
# own test files; the count is the floor.
assert len(CASES) >= 150 and len({c.id for c in CASES}) == len(CASES)


def fill(text: str, tmp: Path) -> str:
    return text.replace(RUN, str(tmp / "run")).replace(TMP, str(tmp))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_one_line_and_changes_nothing(c: Case, base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run", symlinks=True)
    (tmp_path / "afile").write_text("a plain file\n")
    if c.prepare:
        c.prepare(tmp_path / "run")
    before = snapshot(tmp_path)
    env = {k: fill(v, tmp_path) for k, v in c.env.items()}
    result = CliRunner().invoke(main, [fill(a, tmp_path) for a in c.args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == c.code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert c.expect in lines[0], lines[0]
    assert "Traceback" not in result.output
    after = snapshot(tmp_path)
    for rel in c.may_change:
        before.pop(rel, None)
        after.pop(rel, None)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_the_tamper_table_covers_every_file_of_the_exports(base_run):
    """Every file export wrote is hash-listed in the manifest, and each has a tamper case."""
    manifest = json.loads((base_run / "exports" / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    written = {p.relative_to(base_run / "exports").as_posix() for p in (base_run / "exports").rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert listed == written
    tampered = {name.replace("relu-", "relu/") for name, _, _ in TAMPERS}
    assert written <= tampered
    assert len(TAMPERS) == 14


def test_a_clean_copy_passes_verify(base_run, tmp_path):
    """The table's baseline: without a defect the same command succeeds (so the cases can fail)."""
    shutil.copytree(base_run, tmp_path / "run")
    # a 3-evaluation search loses a few points of accuracy; agreement with the student is the point
    result = CliRunner().invoke(main, ["verify", "--exports", str(tmp_path / "run" / "exports"), "--max-drop", "100"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- concurrency

def _deploykit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deploy_kit.console", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_concurrent_exports_into_one_folder_one_wins_at_once(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    out = tmp_path / "same"
    args = ("export", "--config", str(tmp_path / "run" / "result.json"), "--target", "onnx", "--out", str(out))
    first = _deploykit(*args)
    second = _deploykit(*args)
    done = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in done)
    assert codes == [0, 2], done
    loser = next(err for code, err in done if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("already exists" in loser[0] or "another deploykit process" in loser[0]), loser
    from exporters import manifest as mf

    mf.check_exports(mf.load_manifest(out), out)  # the winner's export is whole and sealed


def test_export_with_force_into_a_folder_being_written_fails_at_once(base_run, tmp_path):
    """--force replaces a finished export, never one another process is still writing."""
    shutil.copytree(base_run, tmp_path / "run")
    exports = tmp_path / "run" / "exports"
    before = snapshot(tmp_path)
    fd = os.open(exports, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what an export in flight holds
    try:
        result = CliRunner().invoke(main, ["export", "--config", str(tmp_path / "run" / "result.json"), "--force"])
    finally:
        os.close(fd)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {exports} is being written by another deploykit process "
                                                  "right now; wait for it to finish or choose another --out"]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- reproducible, images

def test_ort_conversion_is_byte_identical_and_its_config_has_no_temp_path(base_run, tmp_path):
    from exporters.ort import CONFIG_NAME, export_ort

    details = [export_ort(base_run / "exports" / "model.onnx", tmp_path / name / "model.ort") for name in ("a", "b")]
    config = (tmp_path / "a" / CONFIG_NAME).read_text()
    assert "/tmp" not in config and "deploykit-ort-" not in config and "# - model.ort" in config
    assert config == (base_run / "exports" / CONFIG_NAME).read_text()
    if details[0]["reproducible"]:
        digests = {hashlib.sha256((tmp_path / n / "model.ort").read_bytes()).hexdigest() for n in ("a", "b")}
        assert digests == {sha256_file(base_run / "exports" / "model.ort")}


@pytest.mark.parametrize("mode, value, expected", [("I;16", 65535, 255), ("I;16", 32896, 128), ("I;16", 0, 0),
                                                   ("L", 200, 200)])
def test_16_bit_pngs_are_scaled_not_saturated(tmp_path, mode, value, expected):
    from PIL import Image

    from deploy_kit.data import _read_image

    dtype = np.uint16 if mode == "I;16" else np.uint8
    Image.fromarray(np.full((8, 8), value, dtype)).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        assert mode != "I;16" or im.mode in ("I;16", "I")  # PIL really decoded 16 bits
    pixels = _read_image(tmp_path / "x.png", None)
    assert pixels.shape == (8, 8, 3) and set(np.unique(pixels)) == {expected}
