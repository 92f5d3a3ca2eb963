"""Multi-byte characters split over byte-level tokens, with the default draft's SmolLM2 tokenizer: the
DecodeStream path and the window path give the same pieces, none splits a character."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from scheduler.loading import DEFAULT_SMALL_DIR
from server.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Héllo wörld — ça va? 日本語のテキスト 🙂🙂 done.\n  indented  twice",
    "Family 👨\u200d👩\u200d👧\u200d👦, flags 🇯🇵🇫🇷, skin 👍🏽, keycap 1️⃣, \U0001d538\u2102",
    "한국어, Ελληνικά, עברית, العربية, ไทย, हिन्दी",
    "e\u0301 combining, ñ, ø, ß, Œuvre, naïve café résumé “quotes” … «guillemets»",
    "中文字符测试\uff1a这是一个很长的句子。漢字とひらがなとカタカナ。",
]


class WithoutBackend:
    """The same tokenizer seen as one without a Rust backend (a SentencePiece or Python tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, *args, **kwargs) -> str:
        return self._tokenizer.decode(*args, **kwargs)


class RefusingStream:
    """A DecodeStream that gives up at once, as it does on some invalid UTF-8 ("Invalid prefix")."""

    def step(self, tokenizer, ids):
        raise Exception("Invalid prefix encountered")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_SMALL_DIR)


def pieces(detok: IncrementalDetokenizer, ids: list[int], group: int = 1) -> list[str]:
    out = [detok.push(ids[i : i + group]) for i in range(0, len(ids), group)]
    return [*out, detok.flush()]


def test_split_characters_come_out_whole_on_both_paths(tokenizer):
    assert tokenizer.backend_tokenizer is not None
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        fast = pieces(IncrementalDetokenizer(tokenizer), ids)
        window = pieces(IncrementalDetokenizer(WithoutBackend(tokenizer)), ids)
        assert fast == window
        assert "".join(fast) == text
        assert not any("\ufffd" in p for p in fast)
        assert any(p == "" for p in fast[:-1]), text  # some tokens held only part of a character
        assert "".join(pieces(IncrementalDetokenizer(tokenizer), ids, group=3)) == text


def test_an_unfinished_character_comes_out_at_flush_only(tokenizer):
    ok = tokenizer.encode("ok", add_special_tokens=False)
    # The first three of 🙂's four bytes, one token each (byte-level BPE spells byte F0 as "ð"),
    # and no token to finish them.
    partial = tokenizer.convert_tokens_to_ids(list("ðŁĻ"))
    assert tokenizer.unk_token_id not in partial
    for t in (tokenizer, WithoutBackend(tokenizer)):
        detok = IncrementalDetokenizer(t)
        assert detok.push(ok) == "ok"
        assert [detok.push([b]) for b in partial] == ["", "", ""]
        assert detok.flush() == "\ufffd"


def test_special_tokens_are_skipped_on_both_paths(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nSalut 🙂<|im_end|>", add_special_tokens=False)
    for t in (tokenizer, WithoutBackend(tokenizer)):
        assert "".join(pieces(IncrementalDetokenizer(t), ids)) == "assistant\nSalut 🙂"


def test_a_refusing_stream_falls_back_to_the_window_mid_stream(tokenizer):
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    head = [detok.push([t]) for t in ids[:20]]
    detok._stream = RefusingStream()
    tail = [detok.push([t]) for t in ids[20:]]
    assert "".join([*head, *tail, detok.flush()]) == TEXTS[1]
    assert detok._stream is None


def test_random_token_streams_add_up_to_their_decode(tokenizer):
    """Arbitrary ids, invalid UTF-8 included: the pieces still add up to what decode() gives."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        want = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(pieces(IncrementalDetokenizer(tokenizer), ids)) == want
