"""The Android (Kotlin), iOS (Swift) and web (JS) examples cannot all run here: at least check that
every manifest key their sources read exists in a manifest.json written by the real exporter, in
the part of the manifest they read it from, so a renamed or dropped key breaks this test and not
an app in the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporters.manifest import load_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Kotlin/org.json: manifest reads are json.getString("key"), prep.getJSONArray("key"), optString("key", ...)
KOTLIN_READ = re.compile(r'\.(?:get|opt)(?:String|Int|Double|Long|Boolean|JSONArray|JSONObject)\(\s*"(\w+)"')
# Swift: the manifest's Decodable structs; property names are the keys in camelCase (convertFromSnakeCase)
SWIFT_STRUCT = re.compile(r"^struct \w+: Decodable \{\n(.*?)^\}", re.S | re.M)
SWIFT_FIELD = re.compile(r"^\s*let (\w+)\s*:", re.M)
# JS: property reads on the objects that come from the manifest, and destructured preprocessing/quantization
JS_OBJECTS = r"(?:manifest|artifact|a|prep|input|quant|quantization|inputs\[0\]|outputs\[0\])"
JS_READ = re.compile(rf"(?<![\w$]){JS_OBJECTS}\.(\w+)")
JS_DESTRUCTURE = re.compile(r"const \{([^}]+)\} = this\.(?:prep|input\.quantization)")
# comments and string literals hold file names ('manifest.json'), not reads; of a template literal
# only the ${...} parts are code
JS_COMMENT = re.compile(r"<!--.*?-->|(?<!:)//[^\n]*", re.S)
JS_TEMPLATE = re.compile(r"`[^`]*`")
JS_STRING = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def kotlin_keys(source: str) -> set[str]:
    return set(KOTLIN_READ.findall(source))


def swift_keys(source: str) -> set[str]:
    return {snake_case(f) for body in SWIFT_STRUCT.findall(source) for f in SWIFT_FIELD.findall(body)}


def js_keys(source: str) -> set[str]:
    source = JS_COMMENT.sub("", source)
    source = JS_TEMPLATE.sub(lambda m: " ".join(re.findall(r"\$\{([^}]*)\}", m.group())), source)
    source = JS_STRING.sub("", source)
    keys = set(JS_READ.findall(source))
    for names in JS_DESTRUCTURE.findall(source):
        keys |= {n.split(":")[0].strip() for n in names.split(",")}
    return keys


def readable_keys(manifest: dict, targets: tuple[str, ...]) -> set[str]:
    """Keys an app can read: the manifest's top level and preprocessing, and the lut artifacts of
    `targets` with their input/output specs and their quantization."""
    entries = [a for a in manifest["artifacts"] if a["target"] in targets and a.get("variant", "lut") == "lut"]
    assert {a["target"] for a in entries} == set(targets)
    specs = [t for a in entries for t in (*a["inputs"], *a["outputs"])]
    objects = [manifest, manifest["preprocessing"], *entries, *specs, *(t["quantization"] for t in specs if t["quantization"])]
    return {k for obj in objects for k in obj}


# (example sources, key extractor, artifact targets the example loads). The web page loads the
# float-input ONNX graph or (LiteRT.js) the .tflite, and quantizes an int8 input if given one.
EXAMPLE_SOURCES = {
    "android": (["android/DeployKitClassifier.kt"], kotlin_keys, ("tflite",)),
    "ios": (["ios/DeployKitClassifier.swift"], swift_keys, ("tflite",)),
    "web": (["web/classifier.js", "web/index.html"], js_keys, ("onnx", "tflite")),
}


@pytest.fixture(scope="module")
def manifest(export_lenet_run) -> dict:
    return load_manifest(export_lenet_run("examples_static", ("onnx", "tflite")))


@pytest.mark.parametrize("example", sorted(EXAMPLE_SOURCES))
def test_every_manifest_key_an_example_reads_is_written_by_the_exporter(manifest, example):
    files, extract, targets = EXAMPLE_SOURCES[example]
    keys = set().union(*(extract((EXAMPLES / f).read_text()) for f in files))
    # the extractor must see the reads every example needs, or this test would pass vacuously
    assert {"schema", "classes", "sha256", "path", "mean", "std", "width", "height", "layout"} <= keys, keys
    missing = keys - readable_keys(manifest, targets)
    assert not missing, f"examples/{example} reads manifest keys the exporter does not write: {sorted(missing)}"


def test_extractors_see_a_renamed_key():
    """A key the exporter does not write is reported, in each language's idiom."""
    assert "zero_pt" in kotlin_keys('val z = q.getInt("zero_pt")')
    assert "zero_pt" in swift_keys("struct Q: Decodable {\n    let zeroPt: Int\n}\n")
    assert {"zero_pt", "mean"} <= js_keys("const {scale: s, zero_pt: z} = this.input.quantization; prep.mean")
    assert js_keys("fetch('manifest.json'); // manifest.schema") == set()
    assert js_keys("`see manifest.json: ${artifact.path}`") == {"path"}


def test_android_and_ios_examples_say_they_are_not_built_here():
    for example in ("android", "ios"):
        assert "Not built or run here" in (EXAMPLES / example / "README.md").read_text()
