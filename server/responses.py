"""Turns the engine's settled tokens into GenerateResponse messages: text, stop strings, logprobs."""

from __future__ import annotations

from bild.v1 import bild_pb2
from transformers import PreTrainedTokenizerBase

from scheduler.logprobs import TokenLogprob
from scheduler.request import FinishReason, RequestStats
from scheduler.scheduler import StepOutput
from server.detokenizer import IncrementalDetokenizer
from server.stops import StopStrings

# The scheduler's finish reasons as the proto names them.
WIRE_FINISH_REASONS = {
    FinishReason.EOS: bild_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: bild_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: bild_pb2.FINISH_REASON_STOP,
}


def _logprob_message(lp: TokenLogprob) -> bild_pb2.TokenLogprob:
    return bild_pb2.TokenLogprob(
        token_id=lp.token, logprob=lp.logprob, top=[bild_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
    )


class ResponseBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], request_id: str) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stops)
        self.request_id = request_id
        self.sent_tokens = 0
        self.finish: FinishReason | None = None

    def build(self, output: StepOutput, stats: RequestStats, seconds: float) -> bild_pb2.GenerateResponse | None:
        """The message for one engine output, or None if it carries nothing yet.

        Tokens go through one at a time, so a stop string ends the stream at the token that
        completed it, even when the large model settled several tokens at once.
        """
        text, tokens, logprobs, stop = [], [], [], None
        for i, token in enumerate(output.tokens):
            safe, stop = self._stops.push(self._detokenizer.push([token]))
            text.append(safe)
            tokens.append(token)
            if output.logprobs:
                logprobs.append(_logprob_message(output.logprobs[i]))
            if stop is not None:
                break
        stop_reason = ""
        if stop is not None:
            self.finish, stop_reason = FinishReason.STOP, stop
        elif output.finish is not None:
            self.finish, stop_reason = output.finish, output.stop_reason or ""
            safe, stop = self._stops.push(self._detokenizer.flush())
            text.append(safe if stop is not None else safe + self._stops.flush())
            if stop is not None:
                self.finish, stop_reason = FinishReason.STOP, stop
        self.sent_tokens += len(tokens)
        if self.finish is None and not tokens:
            return None
        response = bild_pb2.GenerateResponse(
            text="".join(text), token_ids=tokens, logprobs=logprobs, request_id=self.request_id
        )
        if self.finish is not None:
            response.finish_reason = WIRE_FINISH_REASONS[self.finish]
            response.stop_reason = stop_reason
            # A stop string ends the request early: count what the client got, not what was settled.
            values = {**stats.as_dict(), "generated_tokens": self.sent_tokens}
            response.stats.CopyFrom(bild_pb2.GenerationStats(**values, total_seconds=seconds))
        return response
