from scheduler.loading import SMOLLM2_ALIAS, load_tokenizer
from server.detokenizer import IncrementalDetokenizer
from tests import tiny

TEXT = "Héllo wörld — ça va? 日本語のテキスト 🙂🙂 done.\n  indented  twice"


def pieces(tokenizer, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push([t]) for t in tokenizer.encode(text, add_special_tokens=False)]
    return [*out, detok.flush()]


def test_pieces_never_split_a_character_and_add_up_to_the_text():
    for tokenizer in (tiny.build_tokenizer(), load_tokenizer(SMOLLM2_ALIAS)):
        got = pieces(tokenizer, TEXT)
        assert "".join(got) == TEXT
        assert not any("\ufffd" in p for p in got)
        assert any(p == "" for p in got)  # some tokens were only part of a character


def test_special_tokens_are_not_rendered():
    tokenizer = tiny.build_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    ids = [*tokenizer.encode("hi", add_special_tokens=False), tokenizer.eos_token_id]
    assert detok.push(ids) + detok.flush() == "hi"
