"""What a client asks of the engine (`SamplingParams`, checked field by field) and what it gets back (`Event`)."""

from __future__ import annotations

import dataclasses

from mistral_jax.errors import UserError

TOP_LOGPROBS = 20  # alternatives the engine computes for every token (OpenAI's limit); a request asks up to this


class RequestError(UserError):
    """A bad request; `param` names the field at fault (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """The engine's queue is full (or it is shutting down): try again later (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's own end-of-turn ids (unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: each token's logprob and the top N alternatives
    echo_logprobs: bool = False  # also the prompt's tokens' logprobs (completions with echo)

    def __post_init__(self):
        checks = [
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            ("top_k", self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("seed", 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= TOP_LOGPROBS,
             f"logprobs must be between 0 and {TOP_LOGPROBS}, got {self.logprobs}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise RequestError(param, message)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely alternatives at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one request: its next token(s) and the text they complete; the last has finish_reason."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first event only, when echo_logprobs
    error: str | None = None
