// Classify an image in the browser with a deploykit export, on onnxruntime-web's wasm backend.
//
// Everything model-specific comes from the export's manifest.json: which file to load and its
// sha256, the input name, shape, dtype and layout, the preprocessing (size, channels, scale,
// mean/std) and the class labels. Nothing here changes when the model is re-exported.

import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

const MANIFEST_SCHEMA = 'deploykit-manifest/1';

// The model is tiny: one wasm thread avoids needing a cross-origin-isolated page
// (SharedArrayBuffer), which a plain static server does not provide.
ort.env.wasm.numThreads = 1;

export class ClassifierError extends Error {}

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

// onnxruntime-web loads both the .onnx graph and the ORT-format .ort file.
export function pickArtifact(manifest, target = 'onnx', variant = 'lut') {
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

export class Classifier {
  static async create(exportsUrl, {target = 'onnx', variant = 'lut'} = {}) {
    const manifest = await loadManifest(exportsUrl);
    const artifact = pickArtifact(manifest, target, variant);
    const bytes = await fetchVerified(exportsUrl, artifact);
    const session = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm']});
    return new Classifier(manifest, artifact, session);
  }

  constructor(manifest, artifact, session) {
    this.manifest = manifest;
    this.artifact = artifact;
    this.session = session;
    this.input = artifact.inputs[0];
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

  // RGBA → the model's input tensor: gray or RGB per `channels`, (pixel·scale − mean)/std,
  // in the artifact's layout (NCHW for ONNX), quantized only if the input itself is int8.
  tensorFromRGBA(rgba) {
    const {width, height, channels, scale, mean, std} = this.prep;
    const values = new Float32Array(channels * height * width);
    for (let p = 0; p < width * height; p++) {
      const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
      // ITU-R 601 luma in PIL's fixed-point form, so gray matches PIL's convert("L") exactly
      const pixel = channels === 1 ? [(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16] : [r, g, b];
      for (let c = 0; c < channels; c++) {
        const index = this.input.layout === 'NHWC' ? p * channels + c : c * width * height + p;
        values[index] = (pixel[c] * scale - mean[c]) / std[c];
      }
    }
    const dims = this.input.layout === 'NHWC' ? [1, height, width, channels] : [1, channels, height, width];
    if (this.input.dtype === 'int8') {
      const {scale: s, zero_point: z} = this.input.quantization;
      const q = Int8Array.from(values, (v) => Math.max(-128, Math.min(127, Math.round(v / s) + z)));
      return new ort.Tensor('int8', q, dims);
    }
    return new ort.Tensor('float32', values, dims);
  }

  async logits(rgba) {
    const feeds = {[this.input.name]: this.tensorFromRGBA(rgba)};
    const output = (await this.session.run(feeds))[this.artifact.outputs[0].name];
    const quant = this.artifact.outputs[0].quantization;
    return Array.from(output.data, (v) => (quant ? quant.scale * (Number(v) - quant.zero_point) : v));
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
