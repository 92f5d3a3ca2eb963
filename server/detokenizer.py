"""Turns a stream of token ids into a stream of text pieces that never split a UTF-8 character.

Byte-level BPE tokenizers spread one character over several tokens, and a tokenizer may also change
how a token renders depending on what precedes it. So each piece is the difference between decoding
a short window that ends at the new tokens and the same window without them; a piece that ends in
U+FFFD is an unfinished character and waits for the next token.

A tokenizer with a Rust backend (a fast tokenizer) takes these steps in `tokenizers`' own
`DecodeStream`, which does not pay for two Python-side decodes per token; any other tokenizer, or a
stream that DecodeStream refuses (it raises on some invalid UTF-8), decodes the window here. Stop
strings are not this module's concern (server/stops.py), and the pieces start from the first
generated token, without the prompt as left context, either way.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self._ids.extend(ids)
        piece = self._window_piece() if self._stream is None else self._stream_piece(ids)
        if piece:
            # The window slides: the tokens just read become the left context of the next piece.
            self._prefix, self._read = self._read, len(self._ids)
        return piece

    def _stream_piece(self, ids: list[int]) -> str:
        try:
            return self._stream.step(self._backend, ids) or ""
        except Exception:  # "Invalid prefix encountered": from here on, the window is decoded here
            self._stream = None
            return self._window_piece()

    def _window_piece(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        return after[len(before) :]

    def flush(self) -> str:
        """At the end of the stream: whatever is left, unfinished characters included."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""
