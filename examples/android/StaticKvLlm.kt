// Run edgeport's ONNX NPU shape on an Android phone's Hexagon NPU with ONNX Runtime's QNN execution provider.
//
// Gradle: implementation("com.microsoft.onnxruntime:onnxruntime-android-qnn:<version>")
// Copy the artifact folder (its prefill-NN-of-NN.onnx and decode-NN-of-NN.onnx graphs, the weights-NN-of-NN.data
// file each part's two graphs share, npu.json, tokenizer files) into the app's files, and open the graphs by path:
// ONNX Runtime finds the weights file beside them. Token ids in, token ids out: tokenize with the model's tokenizer.json (e.g. a HF tokenizers
// binding). The model comes in parts of consecutive layers, run in order (npu.json's "parts"): the first takes
// input_ids, each other one the previous part's output_hidden_states as hidden_states, the last returns logits; each
// reads and returns the KV cache of its own layers.

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
    private class Part(val sessions: Map<Int, OrtSession>, val layers: IntRange)
    private val parts = (0 until npu.getJSONArray("parts").length()).map { i ->
        val part = npu.getJSONArray("parts").getJSONObject(i)
        Part(
            mapOf(
                chunk to env.createSession(File(dir, part.getString("prefill")).path, options),
                1 to env.createSession(File(dir, part.getString("decode")).path, options),
            ),
            part.getInt("first_layer") until part.getInt("end_layer"),
        )
    }
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

    // One call of every part's graph of `width`: the last real token's logits; the new keys and values go into the cache.
    private fun step(tokens: IntArray, width: Int): FloatArray {
        val past = context - width
        val ids = IntArray(width).also { tokens.copyInto(it) }
        val positions = IntArray(width) { filled + it }
        val mask = FloatArray(width * context) { i ->
            val (row, col) = i / context to i % context
            if (col < filled || (col >= past && col - past <= row)) 0f else maskValue
        }
        var given: Pair<String, OnnxTensor> =
            "input_ids" to OnnxTensor.createTensor(env, IntBuffer.wrap(ids), longArrayOf(1, width.toLong()))
        for ((index, part) in parts.withIndex()) {
            val inputs = mutableMapOf(
                given,
                "position_ids" to OnnxTensor.createTensor(env, IntBuffer.wrap(positions), longArrayOf(1, width.toLong())),
                "attention_mask" to OnnxTensor.createTensor(env, FloatBuffer.wrap(mask), longArrayOf(1, 1, width.toLong(), context.toLong())),
            )
            for (l in part.layers) for ((k, kind) in listOf("key", "value").withIndex()) {
                val pastCache = FloatArray(kvSize.toInt() * past * headDim)
                for (h in 0 until kvSize.toInt()) System.arraycopy(cache[2 * l + k], h * context * headDim, pastCache, h * past * headDim, past * headDim)
                inputs["past_${kind}_$l"] = OnnxTensor.createTensor(env, FloatBuffer.wrap(pastCache), longArrayOf(1, kvSize, past.toLong(), headDim.toLong()))
            }
            val out = part.sessions.getValue(width).run(inputs)
            for (l in part.layers) for ((k, kind) in listOf("key", "value").withIndex()) {
                val new = (out.get("new_${kind}_$l").get() as OnnxTensor).floatBuffer
                for (h in 0 until kvSize.toInt()) for (t in tokens.indices)
                    new.position((h * width + t) * headDim).let { new.get(cache[2 * l + k], (h * context + filled + t) * headDim, headDim) }
            }
            if (index < parts.size - 1) {
                val hidden = (out.get("output_hidden_states").get() as OnnxTensor)
                given = "hidden_states" to OnnxTensor.createTensor(env, hidden.floatBuffer, hidden.info.shape)
                out.close()
                continue
            }
            out.use {
                val vocab = npu.getInt("vocab_size")
                val logits = (it.get("logits").get() as OnnxTensor).floatBuffer
                filled += tokens.size
                return FloatArray(vocab).also { row -> logits.position((tokens.size - 1) * vocab); logits.get(row) }
            }
        }
        error("npu.json lists no parts")
    }
}
