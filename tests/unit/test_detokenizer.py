import random

import pytest

from services.gateway.stream import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _stream(tok, ids, chunk=1):
    d = Detokenizer(tok)
    parts = [d.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    parts.append(d.finish())
    return parts, d


@pytest.mark.parametrize("text", ["Hello wörld — naïve café 😀 日本語", "plain text,\nnew lines  and  spaces"])
def test_incremental_text_equals_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for chunk in (1, 3):
        parts, d = _stream(tokenizer, ids, chunk)
        assert "".join(parts) == d.text == tokenizer.decode(ids)
        assert all("\ufffd" not in p for p in parts)  # multi-byte characters are never split


def test_arbitrary_ids_including_broken_bytes_and_specials(tokenizer):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        parts, _ = _stream(tokenizer, ids)
        assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)
