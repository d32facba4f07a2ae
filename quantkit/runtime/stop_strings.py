"""Stop strings: finish a sample when its decoded text contains one, and cut the text there.

Token boundaries do not line up with strings, so the check runs on the decoded text of the whole
sample (only when the request has stop strings); the returned text ends before the stop string,
as OpenAI's API does.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, tokenizer, stops: list[str] | None) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.cut: int | None = None  # text length to keep once a stop string was found
        self.keep_tokens: int | None = None  # tokens up to the one that completed the stop string

    def check(self, token_ids: list[int]) -> str | None:
        """"stop" when the text of ``token_ids`` first contains a stop string, else None."""
        if not self.stops or self.cut is not None or self.tokenizer is None:
            return None
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        found = [text.find(stop) for stop in self.stops if stop in text]
        if not found:
            return None
        self.cut = min(found)
        self.keep_tokens = len(token_ids)
        return "stop"

    def text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return text if self.cut is None else text[: self.cut]
