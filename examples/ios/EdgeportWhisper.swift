// Transcribe with an edgeport Whisper Core ML artifact (out/<model>-iphone-15-pro/coreml/) in an iOS 18 / macOS 15
// app. Add encoder.mlpackage and decoder.mlpackage to the app target (Xcode compiles them to .mlmodelc) and bundle
// tokenizer.json to turn the token ids back into text (swift-transformers reads it). Compute the 80- or 128-bin
// log-mel features of each 30 s window as Whisper does (WhisperKit's AudioProcessor, or your own vDSP code).
//
// encoder: input_features [1, mels, 3000] -> cross_key, cross_value [layers, 1, heads, 1500, head_dim].
// decoder: input_ids [1, 1], position [1], attention_mask [1, 1, 1, 448] (0 = may attend, -inf = may not) and the
// cross keys and values -> logits [1, 1, vocab]; its self-attention cache is Core ML state (coreml.json).

import CoreML

final class EdgeportWhisper {
    private let encoder: MLModel
    private let decoder: MLModel
    private let cacheLength = 448

    init(encoder encoderURL: URL, decoder decoderURL: URL) throws {
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndNeuralEngine
        encoder = try MLModel(contentsOf: encoderURL, configuration: config)
        decoder = try MLModel(contentsOf: decoderURL, configuration: config)
    }

    /// Greedy tokens of one 30 s window after `prompt` (<|startoftranscript|>, for multilingual models
    /// <|en|> <|transcribe|>, then <|notimestamps|>), up to `endOfText`; ids in `suppressed` (the special
    /// tokens and the config's suppress_tokens) are never chosen. With `languages` (the ids of the language
    /// tokens, those between <|startoftranscript|> and <|translate|>), a multilingual model's language is detected
    /// as Whisper does: the most likely language token after <|startoftranscript|> replaces prompt[1].
    func transcribe(
        features: MLMultiArray, prompt: [Int32], endOfText: Int32, suppressed: Set<Int32>, languages: Range<Int32>? = nil
    ) throws -> [Int32] {
        let audio = try encoder.prediction(from: MLDictionaryFeatureProvider(dictionary: ["input_features": features]))
        let crossKey = audio.featureValue(for: "cross_key")!.multiArrayValue!
        let crossValue = audio.featureValue(for: "cross_value")!.multiArrayValue!
        let state = decoder.makeState()  // the self-attention KV cache, one per window
        var tokens = prompt
        var position = 0
        while position < cacheLength - 1 && tokens.count < cacheLength / 2 {
            let logits = try step(tokens[position], position: position, crossKey: crossKey, crossValue: crossValue, state: state)
            if position == 0, let languages {
                tokens[1] = argmax(logits, excluding: suppressed.subtracting(languages), within: languages)
            }
            position += 1
            if position < tokens.count { continue }  // still reading the prompt
            let token = argmax(logits, excluding: suppressed)
            if token == endOfText { break }
            tokens.append(token)
        }
        return Array(tokens[prompt.count...])
    }

    private func step(_ token: Int32, position: Int, crossKey: MLMultiArray, crossValue: MLMultiArray, state: MLState) throws -> MLMultiArray {
        let ids = try MLMultiArray(shape: [1, 1], dataType: .int32)
        ids[0] = NSNumber(value: token)
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: position)
        let mask = try MLMultiArray(shape: [1, 1, 1, NSNumber(value: cacheLength)], dataType: .float16)
        for col in 0..<cacheLength { mask[col] = NSNumber(value: col <= position ? Float(0) : -Float.infinity) }
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": ids, "position": pos, "attention_mask": mask, "cross_key": crossKey, "cross_value": crossValue,
        ])
        return try decoder.prediction(from: inputs, using: state).featureValue(for: "logits")!.multiArrayValue!
    }

    private func argmax(_ logits: MLMultiArray, excluding suppressed: Set<Int32>, within: Range<Int32>? = nil) -> Int32 {
        var best: Int32 = -1
        var bestValue = -Float.infinity
        let candidates = within.map { Int($0.lowerBound)..<Int($0.upperBound) } ?? 0..<logits.count
        for i in candidates where !suppressed.contains(Int32(i)) {
            let value = logits[i].floatValue
            if value > bestValue { best = Int32(i); bestValue = value }
        }
        return best
    }
}
