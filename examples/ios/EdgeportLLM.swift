// Load an edgeport Core ML model (out/<model>-iphone-15-pro/coreml/) in an iOS 18 / macOS 15 app and stream tokens.
// Add every model-NN-of-NN.mlpackage to the app target (Xcode compiles each to a .mlmodelc) and bundle
// tokenizer.json; tokenize with swift-transformers (https://github.com/huggingface/swift-transformers), which reads it.
//
// The model comes in chunks of consecutive layers, listed in coreml.json's "chunks" in the order they run. Every
// chunk takes causal_mask [1, 1, q, attended] (0 = may attend, -inf = may not) and position [1] (tokens already in
// the cache) and holds the KV cache of its own layers as Core ML state. The first chunk takes input_ids [1, q]; each
// other one the previous chunk's output_hidden_states as hidden_states; the last one returns logits. coreml.json's
// prefill_chunk says which shape it is: null = one flexible function (GPU); a number = static "prefill" and
// "decode" functions (ANE).

import CoreML

final class EdgeportLLM {
    private struct Chunk {
        let prefill: MLModel
        let decode: MLModel
    }

    private let chunks: [Chunk]
    private let chunk: Int?      // the Neural Engine shape's prefill width; nil for the flexible shape
    private let context: Int

    /// `compiledChunks`: the compiled packages in coreml.json's order.
    init(compiledChunks urls: [URL], prefillChunk: Int?, contextLength: Int) throws {
        let config = MLModelConfiguration()
        config.computeUnits = prefillChunk == nil ? .cpuAndGPU : .cpuAndNeuralEngine
        chunks = try urls.map { url in
            guard prefillChunk != nil else {
                let model = try MLModel(contentsOf: url, configuration: config)
                return Chunk(prefill: model, decode: model)
            }
            config.functionName = "prefill"
            let prefill = try MLModel(contentsOf: url, configuration: config)
            config.functionName = "decode"
            return Chunk(prefill: prefill, decode: try MLModel(contentsOf: url, configuration: config))
        }
        chunk = prefillChunk
        context = contextLength
    }

    /// Greedy generation: calls `onToken` with each new token id until `eos` or `maxTokens`.
    func generate(prompt: [Int32], maxTokens: Int, eos: Int32, onToken: (Int32) -> Void) throws {
        let states = chunks.map { $0.decode.makeState() }   // each chunk's KV cache, shared by its two functions
        var logits: MLMultiArray!
        var position = 0
        let width = chunk ?? prompt.count
        while position < prompt.count {
            let tokens = Array(prompt[position..<min(position + width, prompt.count)])
            logits = try step(prefill: true, tokens: tokens, width: width, position: position, states: states)
            position += tokens.count
        }
        var last = (prompt.count - 1) % width   // the row of the prompt's last token in the last call
        for _ in 0..<maxTokens where position < context {
            let token = argmax(logits, row: last)
            if token == eos { return }
            onToken(token)
            logits = try step(prefill: false, tokens: [token], width: 1, position: position, states: states)
            position += 1
            last = 0
        }
    }

    /// One call through every chunk in order: the first takes the tokens, each next one the hidden states.
    private func step(prefill: Bool, tokens: [Int32], width: Int, position: Int, states: [MLState]) throws -> MLMultiArray {
        let attended = chunk == nil ? position + width : context
        let ids = try MLMultiArray(shape: [1, NSNumber(value: width)], dataType: .int32)
        for i in 0..<width { ids[i] = NSNumber(value: i < tokens.count ? tokens[i] : 0) }
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: width), NSNumber(value: attended)], dataType: .float16)
        for row in 0..<width {
            for col in 0..<attended {
                mask[row * attended + col] = NSNumber(value: col <= position + row ? Float(0) : -Float.infinity)
            }
        }
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: position)
        var given: (String, MLMultiArray) = ("input_ids", ids)
        var out: MLFeatureProvider!
        for (index, chunk) in chunks.enumerated() {
            let inputs = try MLDictionaryFeatureProvider(dictionary: [given.0: given.1, "causal_mask": mask, "position": pos])
            out = try (prefill ? chunk.prefill : chunk.decode).prediction(from: inputs, using: states[index])
            if let hidden = out.featureValue(for: "output_hidden_states")?.multiArrayValue {
                given = ("hidden_states", hidden)
            }
        }
        return out.featureValue(for: "logits")!.multiArrayValue!
    }

    private func argmax(_ logits: MLMultiArray, row: Int) -> Int32 {
        let vocab = logits.shape[2].intValue
        var best = 0
        for i in 0..<vocab where logits[row * vocab + i].floatValue > logits[row * vocab + best].floatValue { best = i }
        return Int32(best)
    }
}
