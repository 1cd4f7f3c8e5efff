"""Caption encoder: Gemma-2-2B-it hidden states, prepared exactly as PiD was trained, with an LRU cache.

Recipe (from the official PixelDiT model): prepend the "CHI" instruction prompt, tokenize with
right padding to `chi_tokens + max_length - 2` tokens (truncating), run the decoder stack (final
norm included, no further normalisation), keep the BOS state plus the last `max_length - 1` states.
Each caption's result depends on that caption alone (fixed padding, causal attention), so results
are cached per caption text: bulk jobs mostly reuse one caption.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

HUB_ID = "Efficient-Large-Model/gemma-2-2b-it"
CHI_PROMPT = "\n".join(
    [
        'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
        "image generation. Evaluate the level of detail in the user prompt:",
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
        "relationships to create vivid and concrete scenes.",
        "- If the prompt is already detailed, refine and enhance the existing details slightly without "
        "overcomplicating.",
        "Here are examples of how to transform or refine prompts:",
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
        "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
        "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
        "skyscrapers.",
        "Please generate only the enhanced description for the prompt below and avoid including any additional "
        "commentary or evaluations:",
        "User Prompt: ",
    ]
)


class LRUCache:
    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        if key in self._d:
            self._d.move_to_end(key)
            self.hits += 1
            return self._d[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class CaptionEncoder:
    def __init__(self, tokenizer, model, *, max_length: int = 300, chi_prompt: str = CHI_PROMPT, cache_size: int = 256):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.tokenizer.padding_side = "right"
        self.max_length, self.chi_prompt = max_length, chi_prompt
        self.chi_tokens = len(tokenizer.encode(chi_prompt)) if chi_prompt else 0
        self.cache = LRUCache(cache_size)

    @classmethod
    def from_pretrained(cls, path: str = HUB_ID, *, local_only: bool = True, device="cpu", dtype=None, **kw):
        """Load tokenizer + Gemma-2 decoder from a local directory or hub id (no download unless local_only=False)."""
        from transformers import AutoModel, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            model = AutoModel.from_pretrained(path, local_files_only=local_only, dtype=dtype or torch.float32)
        except OSError as e:
            raise FileNotFoundError(
                f"caption encoder {path!r} is not available locally ({str(e).splitlines()[0]}). Download it once with "
                f"`hf download {HUB_ID} --local-dir DIR` and pass DIR, or allow downloads."
            ) from e
        if hasattr(model, "get_decoder") and not type(model).__name__.endswith("Model"):
            model = model.get_decoder()
        return cls(tok, model.to(device), **kw)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def _encode_batch(self, captions: list[str]) -> torch.Tensor:
        if self.chi_prompt:
            texts = [self.chi_prompt + c for c in captions]
            length = self.chi_tokens + self.max_length - 2
        else:
            texts, length = captions, self.max_length
        device = next(self.model.parameters()).device
        tok = self.tokenizer(texts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        hidden = self.model(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))[0]
        keep = [0] + list(range(hidden.shape[1] - self.max_length + 1, hidden.shape[1]))  # BOS + last max_length-1
        return hidden[:, keep]  # -> [B, max_length, dim]

    def encode(self, captions: list[str] | str) -> torch.Tensor:
        """[B, max_length, dim] embeddings; cached per caption (CPU copies)."""
        if isinstance(captions, str):
            captions = [captions]
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be strings")
        found = {}
        for c in dict.fromkeys(captions):
            hit = self.cache.get(c)
            if hit is not None:
                found[c] = hit
        todo = [c for c in dict.fromkeys(captions) if c not in found]
        if todo:
            for c, emb in zip(todo, self._encode_batch(todo)):
                found[c] = emb.cpu()
                self.cache.put(c, found[c])
        return torch.stack([found[c] for c in captions])


class NullCaptionEncoder:
    """For presets trained without captions: a zero embedding of the network's text shape."""

    def __init__(self, length: int, dim: int):
        self.max_length, self._dim = length, dim

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, captions) -> torch.Tensor:
        n = 1 if isinstance(captions, str) else len(captions)
        return torch.zeros(n, self.max_length, self._dim)
