// Classify a Bitmap with a deploykit export in LiteRT (the TFLite Interpreter API).
//
// Everything model-specific is read at run time: the file name, sha256, input layout and
// preprocessing (size, channels, scale, mean/std) and the labels from assets/manifest.json; the
// int8 scale and zero point from the model's own input and output tensors. A re-export with new
// numbers needs no code change, only new assets.
//
// NOT BUILT in deploykit's CI (no Android SDK there): see README.md.

package com.example.deploykit

import android.content.Context
import android.graphics.Bitmap
import org.json.JSONObject
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.Tensor
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import java.security.MessageDigest
import kotlin.math.exp
import kotlin.math.roundToInt

class DeployKitException(message: String) : Exception(message)

data class Prediction(val label: String, val probability: Float)

/** What the app needs from manifest.json, parsed once. */
private class Manifest(json: JSONObject, variant: String) {
    val classes: List<String>
    val width: Int
    val height: Int
    val channels: Int
    val scale: Float
    val mean: FloatArray
    val std: FloatArray
    val modelPath: String
    val sha256: String
    val layout: String

    init {
        val schema = json.getString("schema")
        if (schema != SCHEMA) throw DeployKitException("manifest.json: expected schema $SCHEMA, found $schema")
        val labels = json.getJSONArray("classes")
        classes = List(labels.length()) { labels.getString(it) }

        val prep = json.getJSONObject("preprocessing")
        width = prep.getInt("width")
        height = prep.getInt("height")
        channels = prep.getInt("channels")
        scale = prep.getDouble("scale").toFloat()
        val means = prep.getJSONArray("mean")
        val stds = prep.getJSONArray("std")
        mean = FloatArray(channels) { means.getDouble(it).toFloat() }
        std = FloatArray(channels) { stds.getDouble(it).toFloat() }

        val artifacts = json.getJSONArray("artifacts")
        val artifact = (0 until artifacts.length()).map { artifacts.getJSONObject(it) }
            .firstOrNull { it.getString("target") == "tflite" && it.optString("variant", "lut") == variant }
            ?: throw DeployKitException("manifest.json: no tflite/$variant artifact; export with `deploykit export --target tflite`")
        modelPath = artifact.getString("path")
        sha256 = artifact.getString("sha256")
        layout = artifact.getJSONArray("inputs").getJSONObject(0).getString("layout")
        if (layout != "NHWC") throw DeployKitException("$modelPath: expected an NHWC input, the manifest says $layout")
    }

    companion object {
        const val SCHEMA = "deploykit-manifest/1"
    }
}

class DeployKitClassifier(context: Context, variant: String = "lut", threads: Int = 2) : AutoCloseable {
    private val manifest: Manifest
    private val interpreter: Interpreter
    private val input: Tensor
    private val output: Tensor

    init {
        val json = context.assets.open("manifest.json").bufferedReader().use { it.readText() }
        manifest = Manifest(JSONObject(json), variant)
        val model = mapAsset(context, manifest.modelPath)
        checkSha256(model, manifest.sha256, manifest.modelPath)
        interpreter = Interpreter(model, Interpreter.Options().setNumThreads(threads))
        input = interpreter.getInputTensor(0)
        output = interpreter.getOutputTensor(0)
    }

    val labels: List<String> get() = manifest.classes

    /** Top-k labels with softmax probabilities, best first. */
    fun classify(bitmap: Bitmap, k: Int = 3): List<Prediction> {
        val outputBytes = ByteBuffer.allocateDirect(output.numBytes()).order(ByteOrder.nativeOrder())
        interpreter.run(inputBuffer(normalized(bitmap)), outputBytes)
        return topK(dequantized(outputBytes), k)
    }

    override fun close() = interpreter.close()

    /** Bitmap → float NHWC values, (pixel·scale − mean)/std per channel, at the manifest's size. */
    private fun normalized(bitmap: Bitmap): FloatArray {
        val (w, h, c) = Triple(manifest.width, manifest.height, manifest.channels)
        val scaled = Bitmap.createScaledBitmap(bitmap, w, h, true) // bilinear, like the Python client
        val argb = IntArray(w * h).also { scaled.getPixels(it, 0, w, 0, 0, w, h) }
        val values = FloatArray(w * h * c)
        for (p in argb.indices) {
            val r = (argb[p] shr 16) and 0xFF
            val g = (argb[p] shr 8) and 0xFF
            val b = argb[p] and 0xFF
            // ITU-R 601 luma in PIL's fixed-point form, so gray matches the training images' convert("L")
            val pixel = if (c == 1) intArrayOf((r * 19595 + g * 38470 + b * 7471 + 0x8000) shr 16) else intArrayOf(r, g, b)
            for (ch in 0 until c) {
                values[p * c + ch] = (pixel[ch] * manifest.scale - manifest.mean[ch]) / manifest.std[ch]
            }
        }
        return values
    }

    /** Float values → the input tensor's bytes: int8 with the tensor's own scale/zero point. */
    private fun inputBuffer(values: FloatArray): ByteBuffer {
        val buffer = ByteBuffer.allocateDirect(input.numBytes()).order(ByteOrder.nativeOrder())
        when (input.dataType()) {
            DataType.INT8 -> {
                val q = input.quantizationParams()
                for (v in values) buffer.put(((v / q.scale).roundToInt() + q.zeroPoint).coerceIn(-128, 127).toByte())
            }
            DataType.FLOAT32 -> values.forEach { buffer.putFloat(it) }
            else -> throw DeployKitException("${manifest.modelPath}: unsupported input type ${input.dataType()}")
        }
        return buffer.rewind() as ByteBuffer
    }

    private fun dequantized(bytes: ByteBuffer): FloatArray {
        bytes.rewind()
        val n = output.shape().last()
        return when (output.dataType()) {
            DataType.INT8 -> {
                val q = output.quantizationParams()
                FloatArray(n) { q.scale * (bytes.get().toInt() - q.zeroPoint) }
            }
            DataType.FLOAT32 -> FloatArray(n) { bytes.getFloat() }
            else -> throw DeployKitException("${manifest.modelPath}: unsupported output type ${output.dataType()}")
        }
    }

    private fun topK(logits: FloatArray, k: Int): List<Prediction> {
        val max = logits.max()
        val exps = logits.map { exp((it - max).toDouble()) }
        val sum = exps.sum()
        // stable sort: ties keep the lower class index, like numpy's argmax
        return logits.indices.sortedByDescending { logits[it] }.take(k)
            .map { Prediction(manifest.classes[it], (exps[it] / sum).toFloat()) }
    }

    private companion object {
        /** Memory-maps an uncompressed asset (needs `noCompress += "tflite"` in the app's build file). */
        fun mapAsset(context: Context, path: String): MappedByteBuffer =
            context.assets.openFd(path).use { fd ->
                FileInputStream(fd.fileDescriptor).channel.use { channel ->
                    channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
                }
            }

        /** A stale or truncated model would classify silently and wrongly: refuse it. */
        fun checkSha256(model: ByteBuffer, expected: String, path: String) {
            val digest = MessageDigest.getInstance("SHA-256").apply { update(model.duplicate()) }.digest()
            val found = digest.joinToString("") { "%02x".format(it) }
            if (found != expected) {
                throw DeployKitException("$path: sha256 mismatch: manifest expects ${expected.take(16)}…, asset is ${found.take(16)}…; copy the exported file again")
            }
        }
    }
}
