"""The source in transformers on the CPU in float32: the reference every artifact's parity is measured against."""

import numpy as np

from edgeport.engines.whisper import WhisperRunner


class TorchRunner:
    """A causal LM's next-token logits."""

    engine = "transformers (torch, CPU, float32)"

    def __init__(self, source, model=None):
        import torch

        self.torch = torch
        self.model = model or source.load_reference()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids])).logits[0]
        return out.float().numpy()


class TorchWhisper(WhisperRunner):
    """Whisper through the shared loop: the encoder once per window, the decoder with transformers' KV cache."""

    def __init__(self, source, model=None):
        import torch
        import transformers

        super().__init__(source.path)
        self.torch = torch
        self.model = model or source.load_reference()
        self.engine = f"transformers {transformers.__version__} (torch, CPU, float32)"

    def encode(self, mel: np.ndarray):
        with self.torch.no_grad():
            return self.model.model.encoder(self.torch.from_numpy(mel)).last_hidden_state

    def begin(self, encoded) -> None:
        self.encoded, self.cache = encoded, None

    def step(self, tokens: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(
                encoder_outputs=(self.encoded,),
                decoder_input_ids=self.torch.tensor([tokens]),
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return out.logits[0, -1].float().numpy()
