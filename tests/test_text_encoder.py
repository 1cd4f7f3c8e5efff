"""Caption encoder with a tiny random Gemma-2 and a small local tokenizer, saved and loaded like the real one."""

import pytest
import torch

from pipeline.encoders.text import CHI_PROMPT, CaptionEncoder

from conftest import WORDS  # noqa: E402,F401


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from conftest import make_tiny_gemma

    return make_tiny_gemma(tmp_path_factory.mktemp("gemma"))


def test_loads_locally_and_keeps_bos_plus_last_tokens(gemma_dir):
    enc = CaptionEncoder.from_pretrained(str(gemma_dir), max_length=12)
    assert enc.chi_tokens == len(enc.tokenizer.encode(CHI_PROMPT)) > 10
    emb = enc.encode(["a cat sleeping", "busy city street"])
    assert emb.shape == (2, 12, 16)
    # recompute by hand: CHI prefix, right padding to chi+max-2, BOS + last 11 states
    texts = [CHI_PROMPT + c for c in ["a cat sleeping", "busy city street"]]
    tok = enc.tokenizer(texts, max_length=enc.chi_tokens + 10, padding="max_length", truncation=True,
                        return_tensors="pt")  # fmt: skip
    assert tok.input_ids[0, 0].item() == 2 and tok.input_ids[0, -1].item() == 0  # BOS first, right padded
    with torch.no_grad():
        hidden = enc.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)[0]
    assert torch.allclose(emb[:, 0], hidden[:, 0]) and torch.allclose(emb[:, 1:], hidden[:, -11:])


def test_cache_is_exact_and_independent_of_batch(gemma_dir):
    enc = CaptionEncoder.from_pretrained(str(gemma_dir), max_length=12, cache_size=2)
    alone = enc.encode("a dog in the city")
    assert enc.cache.misses == 1
    again = enc.encode(["a red cat", "a dog in the city"])
    assert enc.cache.hits == 1 and torch.allclose(again[1], alone[0], atol=1e-6)
    fresh = CaptionEncoder.from_pretrained(str(gemma_dir), max_length=12).encode(["a red cat"])
    assert torch.allclose(again[0], fresh[0], atol=1e-6)
    enc.encode(["the flowers", "a cat"])  # evicts: LRU of size 2
    assert len(enc.cache) == 2


def test_missing_encoder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Efficient-Large-Model/gemma-2-2b-it"):
        CaptionEncoder.from_pretrained(str(tmp_path / "nothing"))
