// Classify a UIImage with a deploykit export in TensorFlow Lite / LiteRT for iOS (TensorFlowLiteSwift).
//
// Everything model-specific is read at run time: the file name, sha256, input layout and
// preprocessing (size, channels, scale, mean/std) and the labels from manifest.json in the app
// bundle; the int8 scale and zero point from the model's own input and output tensors. A
// re-export with new numbers needs no code change, only new resources.
//
// NOT BUILT in deploykit's CI (no Xcode/Swift toolchain there): see README.md.

import CryptoKit
import Foundation
import TensorFlowLite
import UIKit

enum DeployKitError: Error, CustomStringConvertible {
    case manifest(String)
    case model(String)
    case image(String)

    var description: String {
        switch self {
        case .manifest(let m), .model(let m), .image(let m): return m
        }
    }
}

struct Prediction {
    let label: String
    let probability: Float
}

// The parts of manifest.json (schema deploykit-manifest/1) the app reads. Property names are the
// manifest's keys in camelCase (the decoder converts from snake_case).
struct DeployKitManifest: Decodable {
    let schema: String
    let classes: [String]
    let preprocessing: Preprocessing
    let artifacts: [Artifact]
}

struct Preprocessing: Decodable {
    let width: Int
    let height: Int
    let channels: Int
    let scale: Float
    let mean: [Float]
    let std: [Float]
}

struct Artifact: Decodable {
    let target: String
    let variant: String?
    let path: String
    let sha256: String
    let inputs: [TensorSpec]
}

struct TensorSpec: Decodable {
    let name: String
    let dtype: String
    let layout: String?
}

final class DeployKitClassifier {
    static let schema = "deploykit-manifest/1"

    private let manifest: DeployKitManifest
    private let artifact: Artifact
    private let interpreter: Interpreter

    var labels: [String] { manifest.classes }

    /// Loads manifest.json and the tflite model it names from `bundle`, refusing a model whose
    /// sha256 differs from the manifest's.
    init(bundle: Bundle = .main, variant: String = "lut", threads: Int = 2) throws {
        guard let manifestURL = bundle.url(forResource: "manifest", withExtension: "json") else {
            throw DeployKitError.manifest("manifest.json is not in the app bundle; add it to the target's resources")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        manifest = try decoder.decode(DeployKitManifest.self, from: Data(contentsOf: manifestURL))
        guard manifest.schema == Self.schema else {
            throw DeployKitError.manifest("manifest.json: expected schema \(Self.schema), found \(manifest.schema)")
        }
        guard let tflite = manifest.artifacts.first(where: { $0.target == "tflite" && ($0.variant ?? "lut") == variant }) else {
            throw DeployKitError.manifest("manifest.json: no tflite/\(variant) artifact; export with `deploykit export --target tflite`")
        }
        artifact = tflite
        guard tflite.inputs.first?.layout == "NHWC" else {
            throw DeployKitError.manifest("\(tflite.path): expected an NHWC input, the manifest says \(tflite.inputs.first?.layout ?? "nothing")")
        }

        let modelURL = manifestURL.deletingLastPathComponent().appendingPathComponent(tflite.path)
        try Self.checkSha256(of: modelURL, expected: tflite.sha256, name: tflite.path)
        var options = Interpreter.Options()
        options.threadCount = threads
        interpreter = try Interpreter(modelPath: modelURL.path, options: options)
        try interpreter.allocateTensors()
    }

    /// Top-k labels with softmax probabilities, best first.
    func classify(_ image: UIImage, k: Int = 3) throws -> [Prediction] {
        let input = try interpreter.input(at: 0)
        try interpreter.copy(try inputData(normalized(image), for: input), toInputAt: 0)
        try interpreter.invoke()
        return topK(try dequantized(interpreter.output(at: 0)), k: k)
    }

    /// UIImage → float NHWC values, (pixel·scale − mean)/std per channel, at the manifest's size.
    private func normalized(_ image: UIImage) throws -> [Float] {
        let p = manifest.preprocessing
        let rgba = try Self.rgbaPixels(image, width: p.width, height: p.height)
        var values = [Float](repeating: 0, count: p.width * p.height * p.channels)
        for i in 0..<(p.width * p.height) {
            let (r, g, b) = (Int(rgba[4 * i]), Int(rgba[4 * i + 1]), Int(rgba[4 * i + 2]))
            // ITU-R 601 luma in PIL's fixed-point form, so gray matches the training images' convert("L")
            let pixel = p.channels == 1 ? [(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16] : [r, g, b]
            for c in 0..<p.channels {
                values[i * p.channels + c] = (Float(pixel[c]) * p.scale - p.mean[c]) / p.std[c]
            }
        }
        return values
    }

    /// Float values → the input tensor's bytes: int8 with the tensor's own scale/zero point.
    private func inputData(_ values: [Float], for tensor: Tensor) throws -> Data {
        switch tensor.dataType {
        case .int8:
            guard let q = tensor.quantizationParameters else {
                throw DeployKitError.model("\(artifact.path): int8 input without quantization parameters")
            }
            let codes = values.map { Int8(clamping: Int(($0 / q.scale).rounded()) + q.zeroPoint) }
            return codes.withUnsafeBufferPointer { Data(buffer: $0) }
        case .float32:
            return values.withUnsafeBufferPointer { Data(buffer: $0) }
        default:
            throw DeployKitError.model("\(artifact.path): unsupported input type \(tensor.dataType)")
        }
    }

    private func dequantized(_ tensor: Tensor) throws -> [Float] {
        switch tensor.dataType {
        case .int8:
            guard let q = tensor.quantizationParameters else {
                throw DeployKitError.model("\(artifact.path): int8 output without quantization parameters")
            }
            return tensor.data.map { q.scale * Float(Int(Int8(bitPattern: $0)) - q.zeroPoint) }
        case .float32:
            return tensor.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        default:
            throw DeployKitError.model("\(artifact.path): unsupported output type \(tensor.dataType)")
        }
    }

    private func topK(_ logits: [Float], k: Int) -> [Prediction] {
        let maxLogit = logits.max() ?? 0
        let exps = logits.map { exp($0 - maxLogit) }
        let sum = exps.reduce(0, +)
        // ties keep the lower class index, like numpy's argmax
        let order = logits.indices.sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        return order.prefix(k).map { Prediction(label: manifest.classes[$0], probability: exps[$0] / sum) }
    }

    /// Draws the image into an RGBA8 buffer of the model's size (the system's bilinear-like resampling).
    private static func rgbaPixels(_ image: UIImage, width: Int, height: Int) throws -> [UInt8] {
        guard let cgImage = image.cgImage else { throw DeployKitError.image("the image has no bitmap (CIImage-backed?)") }
        var pixels = [UInt8](repeating: 0, count: width * height * 4)
        let drawn = pixels.withUnsafeMutableBytes { buffer -> Bool in
            guard let context = CGContext(data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8,
                                          bytesPerRow: width * 4, space: CGColorSpaceCreateDeviceRGB(),
                                          bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            context.interpolationQuality = .medium
            context.draw(cgImage, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else { throw DeployKitError.image("cannot create a \(width)x\(height) RGBA context") }
        return pixels
    }

    /// A stale or truncated model would classify silently and wrongly: refuse it.
    private static func checkSha256(of url: URL, expected: String, name: String) throws {
        guard let data = try? Data(contentsOf: url, options: .mappedIfSafe) else {
            throw DeployKitError.model("\(name) is not in the app bundle next to manifest.json")
        }
        let found = SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
        guard found == expected else {
            throw DeployKitError.model("\(name): sha256 mismatch: manifest expects \(expected.prefix(16))…, bundle has \(found.prefix(16))…; copy the exported file again")
        }
    }
}
