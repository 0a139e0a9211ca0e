"""GGUF language models through llama.cpp's batch API (llama-cpp-python's low-level
bindings), with continuous batching.

Up to ``parallel`` requests run at once, each in its own *slot*: a sequence id in the
KV cache, a sampler chain of its own (seed, temperature, top_p, grammar) and its own
stop strings and token counts. One ``step`` is one ``llama_decode``: the next token of
every answering slot, then up to PROMPT_TOKENS_PER_STEP prompt tokens of newly admitted
slots, oldest first (a long prompt is read in chunks, so it never holds the others up
by more than one such step; with no slot answering, a chunk is a whole batch). Then
each slot that produced logits samples its next token, whose text goes out just before
the next ``llama_decode`` (``_flush``).

The context: each slot has a KV stream of its own, ``context_size`` cells, so what is
reported as the model's context window is the same per request whatever the load, and
one request cannot take another's room. Own streams also keep each request's numbers
exactly what they are alone: in one shared pool, llama.cpp places a sequence's cells
wherever room is, and the order in which attention adds them up (so the last bits of
the logits, and now and then a greedy choice) would depend on the neighbours.
A slot keeps its tokens after its request ends; the next request with the same
beginning (a conversation's next turn, a common system prompt) reuses them. A long
beginning held by another slot is copied into a free one (that beats reading the
tokens again from COPY_MIN_TOKENS on). A request takes the slot that costs least: what
the slot reuses against the other conversation's cache it would destroy, so several
conversations keep their caches side by side (one per slot) between turns.

The model and its context are used by exactly one thread, the scheduler's; request
threads only tokenize (which reads the vocabulary and nothing else), and the metrics
read how many KV cells the slots hold (``kv_cells``: Python lists, no llama.cpp call).
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import psutil
from llama_cpp import _internals as internals
from llama_cpp import _logger as llama_log
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from appliance.engines import devices, kernels, zero_pages
from appliance.engines.base import (
    EngineInfo,
    Event,
    Failed,
    Finished,
    Generation,
    PromptError,
    TextDelta,
    TokenLogprob,
)
from appliance.engines.stops import StopScanner

log = logging.getLogger(__name__)
llama_log.set_verbose(False)

# llama.cpp's defaults for the parts of sampling the OpenAI API does not expose.
TOP_K = 40
MIN_P = 0.05
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed
BATCH_TOKENS = 512  # most tokens one llama_decode takes
# Prompt tokens one step may read while other streams wait for their next token: on a
# 2-core CPU a prompt token costs ~3.5 ms, so such a step holds them back ~0.5 s at most.
PROMPT_TOKENS_PER_STEP = 128
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
MAX_VIEWS = 64  # logits views kept (one a slot's row, a few times over)
COPY_MIN_TOKENS = 16  # a stream copy costs about what reading a few tokens does
MARK = "\ue000"  # a private-use character: stands for a message's content in the template
# llama_get_logits_ith giving the row's address as an int: the binding's POINTER(c_float)
# result (a pointer object, then its contents for the address) costs a streamed token
# more than the argmax over the row does.
_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ("llama_get_logits_ith", ctypes.CDLL(str(kernels.loaded_library("libllama.so"))))
)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def runs(seqs: set[int]) -> int:
    """How many runs of consecutive numbers ``seqs`` makes."""
    return sum(1 for s in seqs if s - 1 not in seqs)


@dataclass
class _Run:
    """One request inside a slot."""

    generation: Generation
    emit: Callable[[Event], None]
    cancelled: Callable[[], bool]
    sampler: internals.LlamaSampler
    # Plain greedy (temperature 0, no grammar, no penalties): the argmax of the logits,
    # read in place; llama_sampler_sample would copy the whole vocabulary into a
    # candidate array first (~0.17 ms a token, against ~0.02 for the argmax).
    greedy: bool
    scanner: StopScanner
    pending: list[int]  # prompt tokens not yet read into the KV cache
    cached: int  # prompt tokens reused from the KV cache
    produced: int = 0
    next_token: int | None = None  # sampled, not yet in the KV cache
    decode_started: float = 0.0
    # With log-probabilities: tokens whose text has not been emitted yet, and every
    # answer token's log-probability so far.
    unsent: list[TokenLogprob] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds, in order
    run: _Run | None = None


class LlamaEngine:
    def __init__(
        self,
        path: Path,
        context_size: int,
        threads: int,
        gpu_layers: int,
        model_context: int | None = None,
        parallel: int = 1,
        kv_type: str = "f16",
        extra_buffers: bool = True,
        chat_template: str | None = None,
        shared: LlamaEngine | None = None,
        adapters: Sequence[tuple[Path, float]] = (),
    ) -> None:
        """A model and a context of its own; with ``shared``, a context of its own over
        that engine's weights (a specialist over its base: one copy of the weights), and
        ``adapters`` (LoRA files and scales) applied to this context only."""
        kernels.plan()  # llama.cpp's CPU backend, chosen before anything loads one
        n_ctx = min(context_size, model_context) if model_context else context_size
        threads = threads or default_threads()
        self._owns_model = shared is None
        if shared is None:
            model_params = llama_cpp.llama_model_default_params()
            model_params.n_gpu_layers = gpu_layers
            if gpu_layers == 0:
                devices.cpu_only(model_params)
            # Off: plain weights, no repacked (or AMX) kernels; see engines/kernels.py.
            model_params.use_extra_bufts = extra_buffers
            self._model = internals.LlamaModel(
                path_model=str(path), params=model_params, verbose=False
            )
            model = self._model.model
            blocks = llama_cpp.llama_model_n_layer(model) + llama_cpp.llama_model_n_layer_nextn(
                model
            )
            self.placement = devices.placement(gpu_layers, blocks, devices.gpus())
        else:
            self._model = shared._model
            self.placement = shared.placement
        self._adapters: list[Any] = []
        for adapter_path, _ in adapters:
            handle = llama_cpp.llama_adapter_lora_init(
                self._model.model, str(adapter_path).encode()
            )
            if not handle:
                self._free_adapters()
                raise PromptError(f"llama.cpp could not load the adapter {adapter_path}")
            self._adapters.append(handle)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx * parallel
        ctx_params.n_batch = BATCH_TOKENS
        ctx_params.n_ubatch = BATCH_TOKENS
        ctx_params.n_seq_max = parallel
        ctx_params.kv_unified = False  # a stream per slot: see the module's note
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        ctx_params.type_k = ctx_params.type_v = KV_TYPES[kv_type]
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        before = zero_pages.anonymous_ranges()
        try:
            self._ctx = internals.LlamaContext(model=self._model, params=ctx_params, verbose=False)
        except Exception:
            self._free_adapters()
            if self._owns_model:
                self._model.close()
            raise
        if self._adapters:
            # Per context: this context's every step runs with them, and only it; a
            # slot's cached prefix therefore never crosses adapter sets.
            count = len(self._adapters)
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*self._adapters)
            scales = (ctypes.c_float * count)(*(scale for _, scale in adapters))
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, handles, count, scales) != 0:
                self._ctx.close()
                self._free_adapters()
                raise PromptError("llama.cpp refused to apply the adapters to the context")
        # The KV cache, cleared, resident in full: let its pages come as streams fill.
        # (On a GPU the cache is in the GPU's memory, and the driver's threads run.)
        released = zero_pages.release(before) if self.placement.offloaded == 0 else 0
        # Sliding-window layers: the state API leaves out the cells outside the donor's
        # window, which a shorter shared beginning still needs; copy whole streams.
        self._whole_stream_copy = llama_cpp.llama_model_n_swa(self._model.model) > 0
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        for i in range(BATCH_TOKENS):  # every token belongs to one sequence, ever
            self._batch.n_seq_id[i] = 1
        self._slots = [_Slot(seq) for seq in range(parallel)]
        self._busy = 0  # slots with a request
        # Text sampled this step, sent just before the next decode: see _flush.
        self._outbox: list[tuple[Callable[[Event], None], Event]] = []
        self._admitted = 0  # admission order, so that older prompts are read first
        self._order: dict[int, int] = {}
        self.info = EngineInfo(n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers)
        self.info.extra["zero_pages_released_mib"] = released >> 20
        self.info.extra["placement"] = asdict(self.placement)
        self._vocab = self._model.vocab
        self._n_vocab = self._model.n_vocab()
        self._buffer = ctypes.create_string_buffer(64)
        self._pieces: dict[int, bytes] = {}  # token -> its text, as answers use it
        self._views: dict[int, np.ndarray] = {}  # see _logits
        self._add_bos = self._model.add_bos_token()
        self._eog = [
            t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        ]
        self._eog_set = frozenset(self._eog)
        # The file's own template wins; the manifest's is for a file that has none.
        template = self._model.metadata().get("tokenizer.chat_template") or chat_template
        self._formatter = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self._model.token_eos()),
                bos_token=self._token_text(self._model.token_bos()),
            )
            if template
            else None
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._model.token_get_text(token)

    # -- request threads ------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self._formatter is None:
            raise PromptError("this model has no chat template; use /v1/completions", param="model")
        # The template writes the control tokens (<|im_start|>system ...); what the
        # messages say is text, even where it spells a control token: a user must not
        # open a system turn of their own. So the template is rendered around marks,
        # and only its own text is tokenized with control tokens recognised.
        marked = [{**m, "content": f"{MARK}{i}{MARK}"} for i, m in enumerate(messages)]
        formatted = self._formatter(messages=marked)  # type: ignore[arg-type]
        tokens: list[int] = []
        for n, piece in enumerate(formatted.prompt.split(MARK)):
            content = n % 2 == 1
            if content:
                piece = messages[int(piece)]["content"]
            if piece:
                tokens += self._model.tokenize(
                    piece.encode("utf-8"), add_bos=self._add_bos and n == 0, special=not content
                )
        return tokens

    def answer_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """A conversation whose last message is the assistant's, as training reads it:
        the prompt's tokens (the template's, up to where the answer starts) and the
        answer's (its text, then the token that ends its turn)."""
        prompt = self.chat_prompt(messages[:-1])
        whole = self.chat_prompt(messages)
        if whole[: len(prompt)] != prompt:
            raise PromptError("the chat template renders the earlier turns differently")
        rest = whole[len(prompt) :]
        end = next((i for i, t in enumerate(rest) if t in self._eog_set), None)
        if end is None:
            raise PromptError("the chat template ends no assistant turn with an end token")
        return prompt, rest[: end + 1]

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            for i, token in enumerate(prompt):
                if not 0 <= token < self._n_vocab:
                    raise PromptError(
                        f"prompt token {i} is {token}; token ids run from 0 to {self._n_vocab - 1}",
                        param="prompt",
                    )
            return list(prompt)
        tokens: list[int] = self._model.tokenize(
            prompt.encode("utf-8"), add_bos=self._add_bos, special=False
        )
        return tokens

    def detokenize(self, tokens: list[int]) -> tuple[str, list[str]]:
        """The text of token ids, and each token's piece (a piece that splits a UTF-8
        character shows its bytes escaped). Reads the vocabulary only."""
        for i, token in enumerate(tokens):
            if not 0 <= token < self._n_vocab:
                raise PromptError(
                    f"tokens[{i}] is {token}; token ids run from 0 to {self._n_vocab - 1}",
                    param="tokens",
                )
        buffer = ctypes.create_string_buffer(64)
        pieces = []
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, True)
            pieces.append(buffer.raw[:n])
        text = b"".join(pieces).decode("utf-8", errors="replace")
        return text, [p.decode("utf-8", errors="backslashreplace") for p in pieces]

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

    def free_slots(self) -> int:
        return len(self._slots) - self._busy

    def busy_slots(self) -> int:
        return self._busy

    def kv_cells(self) -> tuple[int, int]:
        """KV-cache cells held by running requests, and all cells (each slot has a
        stream of context_size); what finished requests left is reusable, not held.
        Read by other threads too (a gauge): it reads each slot's request once, and
        mid-step it may count a token more or less."""
        held = sum(
            len(s.tokens) + len(run.pending) for s in self._slots if (run := s.run) is not None
        )
        return held, len(self._slots) * self.info.n_ctx

    def _sampler(self, generation: Generation) -> internals.LlamaSampler:
        p = generation.params
        sampler = internals.LlamaSampler()
        if p.ignore_eos:
            sampler.add_logit_bias(self._n_vocab, {t: float("-inf") for t in self._eog})
        if p.presence_penalty or p.frequency_penalty:
            # OpenAI's penalties count every token the answer has so far: the window is
            # the whole answer (llama.cpp's default, the last 64, forgets older ones).
            window = min(p.max_tokens, self.info.n_ctx)
            sampler.add_penalties(
                self._n_vocab, window, 1.0, p.frequency_penalty, p.presence_penalty
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
            sampler.add_dist(RANDOM_SEED if p.seed is None else self._seed(p.seed))
        return sampler

    @staticmethod
    def _plain_greedy(generation: Generation) -> bool:
        """Whether the sampler chain is greedy alone (end tokens banned or not)."""
        p = generation.params
        penalties = p.presence_penalty or p.frequency_penalty
        return p.temperature == 0.0 and p.grammar is None and not penalties

    def _logits(self, index: int) -> np.ndarray:
        """The logits at batch position ``index``: a view of llama.cpp's output buffer,
        read before the next step. Views are kept by address (making one costs more
        than the argmax over it); the buffer's rows sit at the same few addresses step
        after step, and a view is only ever used for the address llama.cpp just gave."""
        address = _logits_address(self._ctx.ctx, index)
        view = self._views.get(address)
        if view is None:
            if not address:
                raise RuntimeError(f"llama.cpp has no logits at batch position {index}")
            if len(self._views) >= MAX_VIEWS:  # the buffer moved: forget the old rows
                self._views.clear()
            row = (ctypes.c_float * self._n_vocab).from_address(address)
            view = self._views[address] = np.ctypeslib.as_array(row)
        return view

    def _argmax(self, index: int, ignore_eos: bool) -> int:
        """The greedy choice at batch position ``index``: the first of the highest
        logits, as llama.cpp's greedy sampler takes it (end tokens left out when banned)."""
        logits = self._logits(index)
        token = int(logits.argmax())
        if ignore_eos and token in self._eog_set:
            masked = logits.copy()
            masked[self._eog] = -np.inf
            token = int(masked.argmax())
        return token

    @staticmethod
    def _seed(seed: int) -> int:
        """A request's seed (any 64-bit integer, negative too) as llama.cpp's 32-bit one,
        never RANDOM_SEED: every seed, 2**32 - 1 and -1 included, is repeatable."""
        return seed % RANDOM_SEED

    def _copy(self, source: int, target: int) -> bool:
        """Copy sequence `source`'s cells into `target`'s (emptied) stream, at the same
        cell indices, so that attention adds them up in the same order. Through the
        state API, which copies the cells the sequence holds: llama.cpp's own
        cross-stream copy takes the whole stream, which then stays resident in full."""
        if self._whole_stream_copy:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, target, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._ctx.memory, source, target, -1, -1)
            return True
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, source)
        # A mapping of its own, unmapped when done: from malloc, a buffer this size
        # would raise glibc's mmap threshold and stay in the heap ever after.
        with mmap.mmap(-1, size) as buffer:
            data = (ctypes.c_uint8 * size).from_buffer(buffer)
            try:
                written = llama_cpp.llama_state_seq_get_data(ctx, data, size, source)
                ok = bool(written) and bool(
                    llama_cpp.llama_state_seq_set_data(ctx, data, written, target)
                )
            finally:
                del data  # the buffer cannot close while exported
        if ok:
            return True
        log.warning("prefix copy failed", extra={"source": source, "target": target})
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, target, -1, -1)
        return False

    def admit(
        self,
        generation: Generation,
        emit: Callable[[Event], None],
        cancelled: Callable[[], bool],
    ) -> None:
        """Give a request a free slot. Busy slots must stay together: llama.cpp
        evaluates only consecutive streams in one pass, so a gap costs a whole extra
        pass every step for as long as both sides run. Among the slots that keep them
        together, the one whose cache shares the longest beginning with the prompt;
        a longer beginning held by another slot is copied in. The prompt is read by
        the following steps."""
        prompt = generation.prompt_tokens
        free = [s for s in self._slots if s.run is None]
        if not free:
            raise RuntimeError("no free slot")
        busy = {s.seq for s in self._slots if s.run is not None}
        held = [common_prefix(s.tokens, prompt) for s in self._slots]  # by seq

        # The slot that costs least: what it reuses (held) against what taking it
        # destroys (its cache past the shared beginning: another conversation's, kept
        # for its next turn). A conversation's next turn goes back to its own slot; a new
        # one to an empty slot, else the one with least to lose, least recently used.
        def cost(s: _Slot) -> tuple[int, int, int, int]:
            lost = len(s.tokens) - held[s.seq]
            return (runs(busy | {s.seq}), lost - held[s.seq], self._order.get(s.seq, 0), s.seq)

        slot = min(free, key=cost)
        cached = held[slot.seq]
        donor = max(self._slots, key=lambda s: held[s.seq])
        shared = min(held[donor.seq], len(prompt) - 1)
        memory = self._ctx.memory
        if shared - cached >= COPY_MIN_TOKENS:
            if self._copy(donor.seq, slot.seq):
                slot.tokens, cached = list(donor.tokens), shared  # then cut to the shared part
            else:
                slot.tokens, cached = [], 0
        cached = min(cached, len(prompt) - 1)  # at least one token makes fresh logits
        if not llama_cpp.llama_memory_seq_rm(memory, slot.seq, cached, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
            cached = 0
        del slot.tokens[cached:]
        slot.run = _Run(
            generation=generation,
            emit=emit,
            cancelled=cancelled,
            sampler=self._sampler(generation),
            greedy=self._plain_greedy(generation),
            scanner=StopScanner(generation.params.stop),
            pending=prompt[cached:],
            cached=cached,
        )
        self._busy += 1
        self._admitted += 1
        self._order[slot.seq] = self._admitted

    def step(self) -> int:
        """One batch step over every slot in use: cancelled requests end, the others
        advance by one token, and prompts are read in the room left (oldest request
        first). Returns the tokens decoded."""
        decoding: list[_Slot] = []  # slots whose next token is sampled, in seq order
        prompting = False
        for slot in self._slots:
            run = slot.run
            if run is None:
                continue
            if run.cancelled():
                self._finish(slot, "cancelled")
            elif run.next_token is not None:
                decoding.append(slot)
            elif run.pending:
                prompting = True
        if prompting:
            return self._mixed_step(decoding)
        if not decoding:
            self._flush()
            return 0
        # Every stream wants one token (the common step, mid-answer): the same batch
        # as _mixed_step would make, with less Python between two decodes, which on a
        # small box is time the model's threads wait.
        batch = self._batch
        added: list[tuple[_Slot, int]] = []
        outputs: list[tuple[_Slot, int]] = []
        for i, slot in enumerate(decoding):
            run = slot.run
            assert run is not None
            token, run.next_token = run.next_token, None
            assert token is not None
            tokens = slot.tokens
            added.append((slot, len(tokens)))
            outputs.append((slot, i))
            batch.token[i] = token
            batch.pos[i] = len(tokens)
            batch.seq_id[i][0] = slot.seq
            batch.logits[i] = True
            tokens.append(token)
        batch.n_tokens = len(decoding)
        return len(decoding) if self._decode(added, outputs) else 0

    def _mixed_step(self, decoding: list[_Slot]) -> int:
        """A step that reads prompts: the decoding slots' tokens, then prompts in the
        room left, oldest request first."""
        feed: dict[int, list[int]] = {}  # seq -> tokens this step reads for it
        for slot in decoding:
            run = slot.run
            assert run is not None and run.next_token is not None
            feed[slot.seq] = [run.next_token]
            run.next_token = None
        # With no stream waiting for its next token, a prompt may fill the whole batch:
        # one 512-token pass is faster than four of 128 and holds nobody back.
        room = min(PROMPT_TOKENS_PER_STEP if feed else BATCH_TOKENS, BATCH_TOKENS - len(feed))
        waiting = sorted(
            (s for s in self._slots if s.run is not None and s.run.pending),
            key=lambda s: self._order[s.seq],
        )
        for slot in waiting:
            run = slot.run
            assert run is not None
            if room > 0:
                feed[slot.seq], run.pending = run.pending[:room], run.pending[room:]
                room -= len(feed[slot.seq])
        # In seq order: llama.cpp puts consecutive sequences in one graph evaluation.
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[tuple[_Slot, int]] = []
        added: list[tuple[_Slot, int]] = []  # each slot's length before this step
        for seq in sorted(feed):
            slot, tokens = self._slots[seq], feed[seq]
            assert slot.run is not None
            wants_logits = not slot.run.pending  # a decode token, or a prompt's last
            added.append((slot, len(slot.tokens)))
            for token in tokens:
                i = batch.n_tokens
                batch.token[i] = token
                batch.pos[i] = len(slot.tokens)
                batch.seq_id[i][0] = seq
                batch.logits[i] = False
                batch.n_tokens = i + 1
                slot.tokens.append(token)
            if wants_logits:
                batch.logits[batch.n_tokens - 1] = True
                outputs.append((slot, batch.n_tokens - 1))
        return int(batch.n_tokens) if self._decode(added, outputs) else 0

    def _decode(self, added: list[tuple[_Slot, int]], outputs: list[tuple[_Slot, int]]) -> bool:
        """Send the text that waits, decode the batch, and sample at each output (slot,
        batch position); False if llama.cpp failed (the slots in the batch fail)."""
        self._flush()
        status = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        if status != 0:
            self._undo(added, f"llama_decode returned {status}")
            return False
        now = time.perf_counter()
        for slot, i in outputs:
            self._sample(slot, i, now)
        return True

    def _sample(self, slot: _Slot, index: int, now: float) -> None:
        run = slot.run
        assert run is not None
        if not run.produced:
            run.decode_started = now
        params = run.generation.params
        top = params.logprobs
        # The model's own distribution, read before the sampler shapes it.
        logits = self._log_softmax(index) if top is not None else None
        if run.greedy:
            token = self._argmax(index, params.ignore_eos)
        else:
            token = llama_cpp.llama_sampler_sample(run.sampler.sampler, self._ctx.ctx, index)
        if token in self._eog_set:
            self._finish(slot, "stop", flush=True)  # a partial stop string is text
            return
        run.produced += 1
        piece = self._piece(token)
        if logits is not None and top is not None:
            run.logprobs.append(float(logits[token]))
            run.unsent.append(TokenLogprob(piece, float(logits[token]), self._top(logits, top)))
        text, stopped = run.scanner.feed(piece)
        if text:
            self._outbox.append((run.emit, TextDelta(text, tuple(run.unsent))))
            run.unsent.clear()
        if stopped:
            self._finish(slot, "stop")
        elif run.produced >= params.max_tokens or len(slot.tokens) >= self.info.n_ctx:
            self._finish(slot, "length")
        else:
            run.next_token = token

    def _log_softmax(self, index: int) -> np.ndarray:
        """Log-probabilities over the vocabulary at batch position ``index``."""
        logits = self._logits(index).astype(np.float64)
        peak = logits.max()
        result: np.ndarray = logits - (peak + np.log(np.exp(logits - peak).sum()))
        return result

    def _top(self, logprobs: np.ndarray, k: int) -> tuple[tuple[bytes, float], ...]:
        if k <= 0:
            return ()
        best = np.argpartition(-logprobs, k)[:k]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        return tuple((self._piece(int(t)), float(logprobs[t])) for t in best)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._read_piece(token)
        return piece

    def _read_piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self._vocab, token, self._buffer, len(self._buffer), 0, False
        )
        if n < 0:  # a piece longer than the buffer: grow it once
            self._buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buffer, -n, 0, False)
        return self._buffer.raw[:n]

    def _finish(self, slot: _Slot, reason: str, flush: bool | None = None) -> None:
        """End a slot's request; the held-back text is sent unless a stop string
        ended it (``flush`` says otherwise)."""
        run = slot.run
        assert run is not None
        self._flush()
        if (reason != "stop" if flush is None else flush) and (rest := run.scanner.flush()):
            run.emit(TextDelta(rest, tuple(run.unsent)))
        decode = time.perf_counter() - run.decode_started if run.produced else 0.0
        prompt = len(run.generation.prompt_tokens)
        run.sampler.close()
        slot.run = None
        self._busy -= 1
        logprobs = tuple(run.logprobs)
        run.emit(Finished(reason, prompt, run.produced, run.cached, decode, logprobs))

    def _undo(self, added: list[tuple[_Slot, int]], why: str) -> None:
        """A failed step: the slots in it lose what it added to the cache and their
        requests fail; the others go on."""
        log.error("batch step failed", extra={"reason": why})
        for slot, length in added:
            llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq, length, -1)
            del slot.tokens[length:]
            if slot.run is not None:
                self.fail(slot, f"the model failed while generating: {why}")

    def _flush(self) -> None:
        """Send the text sampled in the last step. It waits until just before the next
        decode, not sent as sampled: the request thread it wakes then finds the
        interpreter free (this thread is inside llama_decode), instead of waking, finding
        it held, and having to be woken again, which costs a switch on each side of the
        critical path between two decodes. Anything else a request is sent (its end, a
        failure) sends what waits first."""
        if self._outbox:
            for emit, event in self._outbox:
                emit(event)
            self._outbox.clear()

    def fail(self, slot: _Slot, message: str) -> None:
        run = slot.run
        assert run is not None
        self._flush()
        run.sampler.close()
        slot.run = None
        self._busy -= 1
        run.emit(Failed(message))

    def fail_all(self, message: str) -> None:
        """After an unexpected error: every request in a slot fails, the cache is
        cleared (its state is unknown)."""
        for slot in self._slots:
            if slot.run is not None:
                self.fail(slot, message)
            slot.tokens.clear()
        # The cells only: their data is never read again before it is written, and
        # clearing it too would make the whole cache resident again.
        llama_cpp.llama_memory_clear(self._ctx.memory, False)

    def _free_adapters(self) -> None:
        for handle in self._adapters:
            llama_cpp.llama_adapter_lora_free(handle)
        self._adapters = []

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._free_adapters()
        if self._owns_model:  # a specialist's context leaves its base's weights be
            self._model.close()
