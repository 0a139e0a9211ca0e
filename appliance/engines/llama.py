"""GGUF language models through llama-cpp-python.

The model and its context are used by exactly one thread, the scheduler's; request
threads only tokenize (which reads the vocabulary and nothing else). Generation is
our own loop over llama.cpp's sampler chain rather than ``create_completion`` so that
each request carries its own seed, grammar and stop strings, counts its tokens
exactly, and can be stopped between any two tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
from llama_cpp import Llama
from llama_cpp import _internals as internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from appliance.engines.base import (
    EngineInfo,
    Event,
    Failed,
    Finished,
    Generation,
    PromptError,
    TextDelta,
)
from appliance.engines.stops import StopScanner

log = logging.getLogger(__name__)

# llama.cpp's defaults for the parts of sampling the OpenAI API does not expose.
TOP_K = 40
MIN_P = 0.05
PENALTY_LAST_N = 64
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class LlamaEngine:
    def __init__(
        self,
        path: Path,
        context_size: int,
        threads: int,
        gpu_layers: int,
        model_context: int | None = None,
    ) -> None:
        n_ctx = min(context_size, model_context) if model_context else context_size
        threads = threads or default_threads()
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        self.info = EngineInfo(n_ctx=self.llm.n_ctx(), threads=threads, gpu_layers=gpu_layers)
        self._vocab = self.llm._model.vocab
        self._add_bos = self.llm._model.add_bos_token()
        self._eog = [
            t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        ]
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        self._formatter = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self.llm.token_eos()),
                bos_token=self._token_text(self.llm.token_bos()),
            )
            if template
            else None
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm._model.token_get_text(token)

    # -- request threads ------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self._formatter is None:
            raise PromptError("this model has no chat template; use /v1/completions", param="model")
        formatted = self._formatter(messages=messages)  # type: ignore[arg-type]
        # The template writes the special tokens itself (e.g. <|im_start|>).
        return self.llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=self._add_bos, special=True
        )

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            n_vocab = self.llm.n_vocab()
            for i, token in enumerate(prompt):
                if not 0 <= token < n_vocab:
                    raise PromptError(
                        f"prompt token {i} is {token}; token ids run from 0 to {n_vocab - 1}",
                        param="prompt",
                    )
            return list(prompt)
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=self._add_bos, special=False)

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """GBNF for a JSON object, or for JSON matching ``schema``; checked to compile."""
        if schema is None:
            grammar = JSON_GBNF
        else:
            try:
                grammar = json_schema_to_gbnf(json.dumps(schema))
            except Exception as exc:  # the converter raises bare Exceptions
                raise PromptError(
                    f"json_schema cannot be enforced: {exc}",
                    param="response_format.json_schema.schema",
                ) from None
        sampler = llama_cpp.llama_sampler_init_grammar(
            self._vocab, grammar.encode("utf-8"), b"root"
        )
        if not sampler:
            raise PromptError(
                "json_schema cannot be turned into a grammar",
                param="response_format.json_schema.schema",
            )
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    # -- the scheduler's thread -----------------------------------------------------

    def _sampler(self, job: Generation) -> internals.LlamaSampler:
        p = job.params
        sampler = internals.LlamaSampler()
        if p.ignore_eos:
            sampler.add_logit_bias(self.llm.n_vocab(), {t: float("-inf") for t in self._eog})
        if p.presence_penalty or p.frequency_penalty:
            sampler.add_penalties(
                self.llm.n_vocab(), PENALTY_LAST_N, 1.0, p.frequency_penalty, p.presence_penalty
            )
        if p.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._vocab, p.grammar.encode("utf-8"), b"root"
            )
            llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
        if p.temperature == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(TOP_K)
            sampler.add_top_p(p.top_p, 1)
            sampler.add_min_p(MIN_P, 1)
            sampler.add_temp(p.temperature)
            sampler.add_dist(RANDOM_SEED if p.seed is None else p.seed & 0xFFFFFFFF)
        return sampler

    def _load_prompt(self, tokens: list[int]) -> int:
        """Evaluate the prompt, reusing the KV cache for the prefix it shares with the
        previous request; return how many prompt tokens were reused."""
        llm = self.llm
        cached = 0
        for a, b in zip(llm._input_ids, tokens, strict=False):
            if a != b:
                break
            cached += 1
        cached = min(cached, len(tokens) - 1)  # at least one token makes fresh logits
        if cached > 0 and llm._ctx.kv_cache_seq_rm(-1, cached, -1):
            llm.n_tokens = cached
        else:
            llm.reset()
            cached = 0
        llm.eval(tokens[cached:])
        return cached

    def generate(self, job: Generation, cancelled: Callable[[], bool]) -> Iterator[Event]:
        llm = self.llm
        prompt = job.prompt_tokens
        produced = 0
        scanner = StopScanner(job.params.stop)
        sampler: internals.LlamaSampler | None = None
        try:
            cached = self._load_prompt(prompt)
            sampler = self._sampler(job)
            reason = "length"
            decode_started = time.perf_counter()
            while produced < job.params.max_tokens:
                if cancelled():
                    reason = "cancelled"
                    break
                token = sampler.sample(llm._ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                produced += 1
                text, stopped = scanner.feed(llm.detokenize([token]))
                if text:
                    yield TextDelta(text)
                if stopped:
                    reason = "stop"
                    break
                if produced == job.params.max_tokens:
                    break
                if llm.n_tokens >= self.info.n_ctx:
                    break
                llm.eval([token])
            if reason != "stop" and (rest := scanner.flush()):
                yield TextDelta(rest)
            yield Finished(
                reason, len(prompt), produced, cached, time.perf_counter() - decode_started
            )
        except Exception as exc:  # llama.cpp failures surface as RuntimeError
            log.exception("generation failed")
            llm.reset()
            yield Failed(f"the model failed while generating: {exc}")
        finally:
            if sampler is not None:
                sampler.close()

    def close(self) -> None:
        self.llm.close()
