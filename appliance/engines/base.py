"""What every language-model engine takes and gives, independent of the runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None  # GBNF, already checked to compile
    ignore_eos: bool = False
    # Log-probabilities: None, none; 0, each answer token's own; k, and the k likeliest
    # tokens at each place (OpenAI's top_logprobs).
    logprobs: int | None = None


@dataclass(frozen=True)
class Generation:
    """One request for an engine: prompt tokens in, text out."""

    prompt_tokens: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token: its text (bytes as llama.cpp gives them, which may split a
    UTF-8 character), its log-probability under the model (before sampling shaped the
    distribution), and the likeliest tokens at its place when they were asked for."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # The tokens this text came from, when log-probabilities were asked for (a token
    # held back by a stop string comes with the text that follows it).
    tokens: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    decode_seconds: float = 0.0  # first sampled token to the last
    # Each answer token's log-probability, in order (logprobs asked for): what a
    # confidence measure reads, stop-string tokens included.
    token_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed


class PromptError(ValueError):
    """The prompt cannot be run: the message says what and the numbers involved."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class EngineInfo:
    n_ctx: int
    threads: int
    gpu_layers: int
    extra: dict[str, object] = field(default_factory=dict)


class TextEngine(Protocol):
    """A language model that runs several requests at once. ``admit``, ``step`` and
    the slot counts belong to the scheduler's thread only; the prompt methods are safe
    from request threads (they only read the vocabulary)."""

    info: EngineInfo

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    def text_prompt(self, prompt: str | list[int]) -> list[int]: ...

    def json_grammar(self, schema: dict[str, object] | None) -> str: ...

    def detokenize(self, tokens: list[int]) -> tuple[str, list[str]]: ...

    def free_slots(self) -> int: ...

    def busy_slots(self) -> int: ...

    def admit(
        self,
        generation: Generation,
        emit: Callable[[Event], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """Take a request into a free slot; its events go to ``emit``, the last one a
        Finished or a Failed. ``cancelled`` is asked before every step."""
        ...

    def step(self) -> int:
        """Advance every admitted request by one token (or prompt chunk); return the
        number of tokens decoded together."""
        ...

    def fail_all(self, message: str) -> None: ...

    def close(self) -> None: ...
