// Load an edgeport Core ML package (out/<model>-iphone-15-pro/coreml/) in an iOS 18 / macOS 15 app and stream
// tokens. Add model.mlpackage to the app target (Xcode compiles it to model.mlmodelc) and bundle tokenizer.json;
// tokenize with swift-transformers (https://github.com/huggingface/swift-transformers), which reads it.
//
// The package takes input_ids [1, q], causal_mask [1, 1, q, attended] (0 = may attend, -inf = may not) and
// position [1] (tokens already in the cache); its KV cache is Core ML state. coreml.json says which shape it is:
// prefill_chunk null = one flexible function (GPU); a number = static "prefill" and "decode" functions (ANE).

import CoreML

final class EdgeportLLM {
    private let prefill: MLModel
    private let decode: MLModel
    private let chunk: Int?      // the Neural Engine shape's prefill width; nil for the flexible shape
    private let context: Int

    init(compiledModel url: URL, prefillChunk: Int?, contextLength: Int) throws {
        let config = MLModelConfiguration()
        config.computeUnits = prefillChunk == nil ? .cpuAndGPU : .cpuAndNeuralEngine
        if prefillChunk != nil {
            config.functionName = "prefill"
            prefill = try MLModel(contentsOf: url, configuration: config)
            config.functionName = "decode"
            decode = try MLModel(contentsOf: url, configuration: config)
        } else {
            decode = try MLModel(contentsOf: url, configuration: config)
            prefill = decode
        }
        chunk = prefillChunk
        context = contextLength
    }

    /// Greedy generation: calls `onToken` with each new token id until `eos` or `maxTokens`.
    func generate(prompt: [Int32], maxTokens: Int, eos: Int32, onToken: (Int32) -> Void) throws {
        let state = decode.makeState()   // the KV cache, shared by both functions
        var logits: MLMultiArray!
        var position = 0
        let width = chunk ?? prompt.count
        while position < prompt.count {
            let tokens = Array(prompt[position..<min(position + width, prompt.count)])
            logits = try step(prefill, tokens: tokens, width: width, position: position, state: state)
            position += tokens.count
        }
        var last = (prompt.count - 1) % width   // the row of the prompt's last token in the last call
        for _ in 0..<maxTokens where position < context {
            let token = argmax(logits, row: last)
            if token == eos { return }
            onToken(token)
            logits = try step(decode, tokens: [token], width: 1, position: position, state: state)
            position += 1
            last = 0
        }
    }

    private func step(_ model: MLModel, tokens: [Int32], width: Int, position: Int, state: MLState) throws -> MLMultiArray {
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
        let inputs = try MLDictionaryFeatureProvider(dictionary: ["input_ids": ids, "causal_mask": mask, "position": pos])
        return try model.prediction(from: inputs, using: state).featureValue(for: "logits")!.multiArrayValue!
    }

    private func argmax(_ logits: MLMultiArray, row: Int) -> Int32 {
        let vocab = logits.shape[2].intValue
        var best = 0
        for i in 0..<vocab where logits[row * vocab + i].floatValue > logits[row * vocab + best].floatValue { best = i }
        return Int32(best)
    }
}
