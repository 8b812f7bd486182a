"""Whisper as the exporters trace it: the encoder with every decoder layer's cross-attention keys and values,
and one decoder step over a KV cache held outside transformers. Both are written with transformers' own
modules (each wrapper keeps the whole model as `model`, so traced weights keep its parameter names), and the
cache is the only thing that differs between ONNX (past in, new entries out) and Core ML (state written in
place)."""

import torch


def _split_heads(x, heads: int):
    batch, length, d = x.shape
    return x.view(batch, length, heads, d // heads).transpose(1, 2)


def _attention(q, keys, values, heads: int, mask=None):
    """Attention of [1, length, d] queries over [1, heads, attended, head_dim] keys and values."""
    batch, length, d = q.shape
    q = _split_heads(q, heads) * (d // heads) ** -0.5
    scores = q @ keys.transpose(-1, -2).to(q.dtype)
    if mask is not None:
        scores = scores + mask
    out = torch.softmax(scores, dim=-1) @ values.to(q.dtype)
    return out.transpose(1, 2).reshape(batch, length, d)


class CrossKV(torch.nn.Module):
    """input_features [1, mels, 3000] -> cross_key, cross_value [layers, 1, heads, 1500, head_dim]: the encoder,
    then what every decoder layer's cross-attention needs of its output, computed once per window. Given a span
    [first, end) of the encoder's layers, only that span: from the previous span's hidden states where it does not
    start the encoder (the convolutions and positions come first where it does), ending with the final norm and the
    decoder's cross-attention projections only with `cross`. The ONNX converter exports the encoder a span at a
    time, with one span's weights in memory, and those projections as a span of their own."""

    def __init__(self, model, first: int = 0, end: int | None = None, cross: bool = True):
        super().__init__()
        self.model = model
        self.heads = model.config.decoder_attention_heads
        self.first, self.end, self.cross = first, len(model.model.encoder.layers) if end is None else end, cross

    def forward(self, inputs):
        encoder, gelu = self.model.model.encoder, torch.nn.functional.gelu
        hidden = inputs
        if self.first == 0:
            hidden = gelu(encoder.conv2(gelu(encoder.conv1(inputs)))).permute(0, 2, 1) + encoder.embed_positions.weight
        for layer in encoder.layers[self.first : self.end]:
            hidden = layer(hidden, None)
        if not self.cross:
            return hidden
        hidden = encoder.layer_norm(hidden)
        layers = self.model.model.decoder.layers
        keys = [_split_heads(layer.encoder_attn.k_proj(hidden), self.heads) for layer in layers]
        values = [_split_heads(layer.encoder_attn.v_proj(hidden), self.heads) for layer in layers]
        return torch.stack(keys), torch.stack(values)


def decoder_step(model, input_ids, position_ids, attention_mask, cross_key, cross_value, cache):
    """Logits of `input_ids` at `position_ids`; `cache(layer, keys, values)` takes the new tokens' self-attention
    keys and values and returns everything they attend to."""
    hidden = embedded(model, input_ids, position_ids)
    return logits(model, decoder_layers(model, hidden, attention_mask, cross_key, cross_value, cache))


def embedded(model, input_ids, position_ids):
    decoder = model.model.decoder
    return decoder.embed_tokens(input_ids.long()) + decoder.embed_positions.weight[position_ids.long()]


def decoder_layers(model, x, attention_mask, cross_key, cross_value, cache):
    heads = model.config.decoder_attention_heads
    for i, layer in enumerate(model.model.decoder.layers):
        attn = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        keys, values = cache(i, _split_heads(attn.k_proj(h), heads), _split_heads(attn.v_proj(h), heads))
        x = x + attn.out_proj(_attention(attn.q_proj(h), keys, values, heads, attention_mask))
        cross = layer.encoder_attn
        h = layer.encoder_attn_layer_norm(x)
        x = x + cross.out_proj(_attention(cross.q_proj(h), cross_key[i], cross_value[i], heads))
        h = layer.final_layer_norm(x)
        x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    return x


def logits(model, x):
    decoder = model.model.decoder
    table = decoder.embed_tokens.weight  # Whisper's output projection is tied; in fp16 where the converter halves it
    return (decoder.layer_norm(x).to(table.dtype) @ table.T).float()


DECODER_UNITS = {  # inputs and outputs of each unit of the decoder DecoderStep exports
    "embedding": (["input_ids", "position_ids"], ["output_hidden_states"]),
    "layers": (
        ["hidden_states", "attention_mask", "past_key", "past_value", "cross_key", "cross_value"],
        ["output_hidden_states", "new_key", "new_value"],
    ),
    "head": (["hidden_states"], ["logits"]),
}


class DecoderStep(torch.nn.Module):
    """The decoder over a past passed in: returns the logits and only the new tokens' keys and values
    ([layers, 1, heads, tokens, head_dim]), which the app appends or writes into its cache.

    Or one unit of it (`unit`), as the ONNX converter exports it, a unit's weights at a time: "embedding"
    (input_ids, position_ids -> hidden states), "layers" (hidden states, attention_mask, past_key, past_value,
    cross_key, cross_value -> hidden states, new keys and values) or "head" (hidden states -> logits)."""

    def __init__(self, model, unit: str | None = None):
        super().__init__()
        self.model = model
        self.unit = unit

    def forward(self, *inputs):
        if self.unit == "embedding":
            return embedded(self.model, *inputs)
        if self.unit == "head":
            return logits(self.model, *inputs)
        if self.unit is None:
            input_ids, position_ids, *inputs = inputs
            hidden = embedded(self.model, input_ids, position_ids)
        else:
            hidden, *inputs = inputs
        attention_mask, past_key, past_value, cross_key, cross_value = inputs
        new = []

        def cache(i, k, v):
            new.append((k, v))
            return torch.cat([past_key[i], k], dim=2), torch.cat([past_value[i], v], dim=2)

        hidden = decoder_layers(self.model, hidden, attention_mask, cross_key, cross_value, cache)
        keys, values = torch.stack([k for k, _ in new]), torch.stack([v for _, v in new])
        return (hidden if self.unit else logits(self.model, hidden)), keys, values


class StatefulDecoder(torch.nn.Module):
    """One token over keyCache and valueCache [layers, 1, heads, length, head_dim], Core ML state: its keys and
    values are written at `position` in place, and the mask opens the filled positions."""

    def __init__(self, model, cache_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        shape = cache_shape
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids, position, attention_mask, cross_key, cross_value):
        def cache(i, k, v):
            self.keyCache[i, :, :, position[0] : position[0] + 1, :] = k.to(torch.float16)
            self.valueCache[i, :, :, position[0] : position[0] + 1, :] = v.to(torch.float16)
            return self.keyCache[i], self.valueCache[i]

        return decoder_step(self.model, input_ids, position[None], attention_mask, cross_key, cross_value, cache)
