"""One Whisper runner per engine, all driven by `transcribe`'s loop: transformers (the source), ONNX Runtime,
MLX (mlx-whisper's model), CTranslate2 and Core ML (macOS only)."""

from pathlib import Path

import numpy as np

from edgeport.runtime.transcribe import WhisperRunner


class TorchWhisper(WhisperRunner):
    """The source in transformers on the CPU, float32: the parity reference."""

    def __init__(self, folder: Path, model=None):
        import torch
        import transformers

        super().__init__(folder)
        self.torch = torch
        self.model = model or transformers.WhisperForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True
        )
        self.model.eval()
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
