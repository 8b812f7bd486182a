// Run edgeport's ONNX NPU shape on an Android phone's Hexagon NPU with ONNX Runtime's QNN execution provider.
//
// Gradle: implementation("com.microsoft.onnxruntime:onnxruntime-android-qnn:<version>")
// Copy the artifact folder (prefill.onnx, decode.onnx, npu.json, tokenizer files) into the app's files.
// Token ids in, token ids out: tokenize with the model's tokenizer.json (e.g. a HF tokenizers binding).

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import org.json.JSONObject
import java.io.File
import java.nio.FloatBuffer
import java.nio.IntBuffer

class StaticKvLlm(dir: File) {
    private val env = OrtEnvironment.getEnvironment()
    private val npu = JSONObject(File(dir, "npu.json").readText())
    private val chunk = npu.getInt("prefill_chunk")
    private val context = npu.getInt("context_length")
    private val layers = npu.getInt("layers")
    private val kvSize = npu.getInt("kv_heads").toLong()
    private val headDim = npu.getInt("head_dim")
    private val maskValue = npu.getDouble("mask_value").toFloat()
    private val options = OrtSession.SessionOptions().apply { addQnn(mapOf("backend_path" to "libQnnHtp.so")) }
    private val sessions = mapOf(
        chunk to env.createSession(File(dir, "prefill.onnx").path, options),
        1 to env.createSession(File(dir, "decode.onnx").path, options),
    )
    // Per layer, keys then values: [kv_heads, context, head_dim], filled up to `filled` positions.
    private val cache = Array(layers * 2) { FloatArray(kvSize.toInt() * context * headDim) }
    private var filled = 0

    fun generate(prompt: IntArray, maxTokens: Int, eos: Int, onToken: (Int) -> Unit) {
        filled = 0
        var logits = FloatArray(0)
        for (start in prompt.indices step chunk) logits = step(prompt.copyOfRange(start, minOf(start + chunk, prompt.size)), chunk)
        repeat(maxTokens) {
            val token = logits.indices.maxBy { logits[it] }
            if (token == eos || filled >= context) return
            onToken(token)
            logits = step(intArrayOf(token), 1)
        }
    }

    // One call of the graph of `width`: the last real token's logits; the new keys and values go into the cache.
    private fun step(tokens: IntArray, width: Int): FloatArray {
        val past = context - width
        val ids = IntArray(width).also { tokens.copyInto(it) }
        val positions = IntArray(width) { filled + it }
        val mask = FloatArray(width * context) { i ->
            val (row, col) = i / context to i % context
            if (col < filled || (col >= past && col - past <= row)) 0f else maskValue
        }
        val inputs = mutableMapOf(
            "input_ids" to OnnxTensor.createTensor(env, IntBuffer.wrap(ids), longArrayOf(1, width.toLong())),
            "position_ids" to OnnxTensor.createTensor(env, IntBuffer.wrap(positions), longArrayOf(1, width.toLong())),
            "attention_mask" to OnnxTensor.createTensor(env, FloatBuffer.wrap(mask), longArrayOf(1, 1, width.toLong(), context.toLong())),
        )
        for (l in 0 until layers) for ((k, kind) in listOf("key", "value").withIndex()) {
            val pastCache = FloatArray(kvSize.toInt() * past * headDim)
            for (h in 0 until kvSize.toInt()) System.arraycopy(cache[2 * l + k], h * context * headDim, pastCache, h * past * headDim, past * headDim)
            inputs["past_${kind}_$l"] = OnnxTensor.createTensor(env, FloatBuffer.wrap(pastCache), longArrayOf(1, kvSize, past.toLong(), headDim.toLong()))
        }
        sessions.getValue(width).run(inputs).use { out ->
            for (l in 0 until layers) for ((k, kind) in listOf("key", "value").withIndex()) {
                val new = (out.get("new_${kind}_$l").get() as OnnxTensor).floatBuffer
                for (h in 0 until kvSize.toInt()) for (t in tokens.indices)
                    new.position((h * width + t) * headDim).let { new.get(cache[2 * l + k], (h * context + filled + t) * headDim, headDim) }
            }
            val vocab = npu.getInt("vocab_size")
            val logits = (out.get("logits").get() as OnnxTensor).floatBuffer
            filled += tokens.size
            return FloatArray(vocab).also { logits.position((tokens.size - 1) * vocab); logits.get(it) }
        }
    }
}
