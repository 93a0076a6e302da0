"""Generated text as it may be sent: whole characters only, never a piece of a stop string."""

from __future__ import annotations

from collections.abc import Sequence

from mistral_jax.tokenizers.base import DecodeStream


class StopText:
    """Feeds tokens through a `DecodeStream` and holds back text that could still become a stop string."""

    def __init__(self, decoder: DecodeStream, stop: Sequence[str]) -> None:
        self._decoder = decoder
        self._stop = tuple(stop)
        self._held = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string was reached: the text before it is final)."""
        self._held += self._decoder.step(token_id)
        found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if found:
            text, self._held = self._held[: min(found)], ""
            return text, True
        keep = max((k for s in self._stop for k in range(1, len(s)) if self._held.endswith(s[:k])), default=0)
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text):]
        return text, False

    def flush(self) -> str:
        """The text held back, at the end of a generation that stopped for another reason."""
        text, self._held = self._held, ""
        return text
