// Classify an image in the browser with a deploykit export, on one of two WebAssembly runtimes:
// onnxruntime-web (the .onnx graph or the .ort file) or LiteRT.js (the .tflite file phones run).
//
// Everything model-specific comes from the export's manifest.json: which file to load and its
// sha256, the input name, shape, dtype and layout, the preprocessing (size, channels, scale,
// mean/std) and the class labels. Nothing here changes when the model is re-exported.
// Each runtime's module and wasm are imported only when that runtime is picked, from this
// folder's node_modules: nothing is fetched from a CDN.

import {pinBatchToOne} from './tflite_batch.js';

const MANIFEST_SCHEMA = 'deploykit-manifest/1';

export class ClassifierError extends Error {}

// ----------------------------------------------------------------------------- runtimes

// onnxruntime-web loads both the .onnx graph and the ORT-format .ort file.
async function openOnnxRuntime(bytes, artifact) {
  const ort = await import('./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs');
  // The model is tiny: one wasm thread avoids needing a cross-origin-isolated page
  // (SharedArrayBuffer), which a plain static server does not provide.
  ort.env.wasm.numThreads = 1;
  const session = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm']});
  const [inputName, outputName] = [artifact.inputs[0].name, artifact.outputs[0].name];
  return {
    name: 'onnxruntime-web',
    async run(data, dims) {
      const tensor = new ort.Tensor(data instanceof Int8Array ? 'int8' : 'float32', data, dims);
      return (await session.run({[inputName]: tensor}))[outputName].data;
    },
  };
}

// LiteRT.js picks the wasm build the browser supports (relaxed SIMD or not) from this folder;
// without `threads`/`jspi` it needs no cross-origin isolation either.
const LITERT_WASM = new URL('./node_modules/@litertjs/core/wasm/', import.meta.url).href;
let liteRtLoading = null;

async function openLiteRt(bytes, artifact) {
  // LiteRT.js 2.5's tensors are float32, int32 or uint8: it cannot feed or read an int8 tensor
  // (loading such a model fails with "Element type INT8 is not supported"). A model exported
  // with `--io float` quantizes its input and dequantizes its output inside the graph, with the
  // scale and zero point the int8 edges have; `verify` checks it against the student like any export.
  const edges = [...artifact.inputs, ...artifact.outputs].filter((t) => t.dtype !== 'float32');
  if (edges.length) {
    throw new ClassifierError(`${artifact.path}: LiteRT.js has no ${edges[0].dtype} tensors ` +
                              `(${edges[0].name}); export the browser's model with ` +
                              '`deploykit export --target tflite --io float`');
  }
  const litert = await import('./node_modules/@litertjs/core/dist/index.js');
  liteRtLoading ??= litert.loadLiteRt(LITERT_WASM);
  await liteRtLoading;
  pinBatchToOne(bytes); // LiteRT.js cannot resize a dynamic batch (tflite_batch.js)
  const model = await litert.loadAndCompile(bytes, {accelerator: 'wasm'});
  return {
    name: 'litert.js',
    async run(data, dims) {
      const tensor = new litert.Tensor(data, dims);
      try {
        const results = await model.run(tensor);
        try {
          return results[0].toTypedArray(); // a copy out of the wasm heap
        } finally {
          results.forEach((t) => t.delete()); // LiteRT.js tensors are freed by hand
        }
      } finally {
        tensor.delete();
      }
    },
  };
}

// The runtime switch: `?target=` names the manifest artifact, which names its runtime.
export const RUNTIMES = {
  onnx: {label: 'onnxruntime-web — model.onnx', open: openOnnxRuntime},
  ort: {label: 'onnxruntime-web — model.ort', open: openOnnxRuntime},
  tflite: {label: 'LiteRT.js — .tflite', open: openLiteRt},
};

// ----------------------------------------------------------------------------- the export

export async function loadManifest(exportsUrl) {
  const url = new URL('manifest.json', exportsUrl);
  const response = await fetch(url);
  if (!response.ok) {
    throw new ClassifierError(`${url}: HTTP ${response.status}; serve the folder written by \`deploykit export\``);
  }
  const manifest = await response.json();
  if (manifest.schema !== MANIFEST_SCHEMA) {
    throw new ClassifierError(`${url}: expected schema ${MANIFEST_SCHEMA}, found ${JSON.stringify(manifest.schema)}`);
  }
  return manifest;
}

export function pickArtifact(manifest, target = 'onnx', variant = 'lut') {
  if (!(target in RUNTIMES)) {
    throw new ClassifierError(`target ${JSON.stringify(target)}: this page runs ${Object.keys(RUNTIMES).join(', ')}`);
  }
  const artifact = manifest.artifacts.find((a) => a.target === target && (a.variant ?? 'lut') === variant);
  if (!artifact) {
    const have = manifest.artifacts.map((a) => `${a.target}/${a.variant}`).join(', ');
    throw new ClassifierError(`manifest.json: no ${target}/${variant} artifact (it has: ${have}); ` +
                              `export it with \`deploykit export --target ${target}\``);
  }
  return artifact;
}

async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

// A stale or truncated copy would classify silently and wrongly: refuse it.
async function fetchVerified(exportsUrl, artifact) {
  const url = new URL(artifact.path, exportsUrl);
  const response = await fetch(url);
  if (!response.ok) throw new ClassifierError(`${url}: HTTP ${response.status}; copy ${artifact.path} next to manifest.json`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const digest = await sha256Hex(bytes);
  if (digest !== artifact.sha256) {
    throw new ClassifierError(`${artifact.path}: sha256 mismatch: manifest expects ${artifact.sha256.slice(0, 16)}…, ` +
                              `file is ${digest.slice(0, 16)}…; copy the exported file again`);
  }
  return bytes;
}

// numpy's rint (round half to even), which the Python runners quantize with; Math.round
// rounds halves up and would move a value that lands exactly between two codes.
function roundHalfEven(v) {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// (pixel·scale − mean)/std one float32 step at a time, as deploykit's numpy `normalize` does,
// so the float input equals Python's bit for bit and a value on a quantization boundary lands
// on the same code.
function normalized(pixel, scale, mean, std) {
  const f = Math.fround;
  return f(f(f(pixel * scale) - f(mean)) / f(std));
}

// ----------------------------------------------------------------------------- the classifier

export class Classifier {
  static async create(exportsUrl, {target = 'onnx', variant = 'lut'} = {}) {
    const manifest = await loadManifest(exportsUrl);
    const artifact = pickArtifact(manifest, target, variant);
    const bytes = await fetchVerified(exportsUrl, artifact);
    const runtime = await RUNTIMES[target].open(bytes, artifact);
    return new Classifier(manifest, artifact, runtime);
  }

  constructor(manifest, artifact, runtime) {
    this.manifest = manifest;
    this.artifact = artifact;
    this.runtime = runtime;
    this.input = artifact.inputs[0];
    this.output = artifact.outputs[0];
    this.prep = manifest.preprocessing;
  }

  // Any drawable (ImageBitmap, <img>, <canvas>) → uint8 RGBA at the model's input size.
  rgbaAtModelSize(drawable) {
    const {width, height} = this.prep;
    const canvas = new OffscreenCanvas(width, height);
    const context = canvas.getContext('2d', {willReadFrequently: true});
    context.drawImage(drawable, 0, 0, width, height);
    return context.getImageData(0, 0, width, height).data;
  }

  // RGBA → the model's input: gray or RGB per `channels`, (pixel·scale − mean)/std, in the
  // artifact's layout (NCHW for ONNX, NHWC for TFLite), quantized only if the input itself is
  // int8 (the ONNX graph and a `--io float` .tflite take float32 and quantize inside).
  inputFromRGBA(rgba) {
    const {width, height, channels, scale, mean, std} = this.prep;
    const nhwc = this.input.layout === 'NHWC';
    const values = new Float32Array(channels * height * width);
    for (let p = 0; p < width * height; p++) {
      const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
      // ITU-R 601 luma in PIL's fixed-point form, so gray matches PIL's convert("L") exactly
      const pixel = channels === 1 ? [(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16] : [r, g, b];
      for (let c = 0; c < channels; c++) {
        values[nhwc ? p * channels + c : c * width * height + p] = normalized(pixel[c], scale, mean[c], std[c]);
      }
    }
    const dims = nhwc ? [1, height, width, channels] : [1, channels, height, width];
    if (this.input.dtype !== 'int8') return {data: values, dims};
    const {scale: s, zero_point: z} = this.input.quantization;
    // divide in float32, as numpy does on the float32 batch
    const data = Int8Array.from(values, (v) => Math.max(-128, Math.min(127, roundHalfEven(Math.fround(v / Math.fround(s))) + z)));
    return {data, dims};
  }

  async logits(rgba) {
    const {data, dims} = this.inputFromRGBA(rgba);
    const output = await this.runtime.run(data, dims);
    const quant = this.output.quantization;
    // an int8 output is dequantized in float32, as the Python runner does
    return Array.from(output, (v) => (quant ? Math.fround(Math.fround(quant.scale) * (Number(v) - quant.zero_point)) : v));
  }

  topK(logits, k = 3) {
    const max = Math.max(...logits);
    const exps = logits.map((v) => Math.exp(v - max));
    const sum = exps.reduce((a, b) => a + b, 0);
    // ties keep the lower class index, like numpy's argmax
    const order = logits.map((_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
    return order.slice(0, k).map((i) => ({index: i, label: this.manifest.classes[i], probability: exps[i] / sum}));
  }

  async classify(drawable, k = 3) {
    const rgba = this.rgbaAtModelSize(drawable);
    const start = performance.now();
    const logits = await this.logits(rgba);
    return {top: this.topK(logits, k), logits, ms: performance.now() - start};
  }
}

// Raw pixels, no browser color management: what the model was trained on.
export function decodeImage(blob) {
  return createImageBitmap(blob, {colorSpaceConversion: 'none', premultiplyAlpha: 'none'});
}
