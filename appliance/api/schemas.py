"""The OpenAI request and response shapes as pydantic models: they validate requests
and they are the source of /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Temperature = Field(default=None, ge=0.0, le=2.0, description="0 is greedy decoding.")
TopP = Field(default=None, gt=0.0, le=1.0)
Penalty = Field(default=None, ge=-2.0, le=2.0)
Seed = Field(default=None, ge=-(2**63), lt=2**64)
MAX_TOP_LOGPROBS = 20  # OpenAI's limits
MAX_COMPLETION_LOGPROBS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GroundingRequest(_Strict):
    collections: list[str] | None = Field(
        default=None,
        min_length=1,
        description="The collections to search (default: every one the caller may read).",
    )
    top_k: int = Field(default=3, ge=1, le=20, description="Passages given as sources.")


class TokenizeRequest(_Strict):
    model: str | None = Field(default=None, description="A chat model (default: the default).")
    content: str | None = Field(default=None, max_length=1_000_000, description="Text.")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="A chat, counted through its template."
    )
    with_pieces: bool = Field(default=False, description="Each token's text too.")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class RetrieveRequest(_Strict):
    query: str = Field(min_length=1, max_length=4096)
    collections: list[str] | None = Field(default=None, min_length=1)
    top_k: int = Field(default=5, ge=1, le=20)
    vector_weight: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="The embedding list's weight in the fusion, to check retrieval with "
        "another (default: the collections' calibrated weight, else 1).",
    )


class Grounded(BaseModel):
    """Extension, on a grounded answer (and a grounded stream's last chunk)."""

    collections: list[str]
    no_source: bool = Field(description="Nothing relevant was found; the answer says so.")
    threshold: float
    best_similarity: float | None
    sources: list[dict[str, Any]] = Field(description="The passages the model was given, numbered.")
    citations: list[dict[str, Any]] = Field(
        description="The sources the answer cites, with their text."
    )
    removed_citations: int = Field(description="Citations of sources it was not given, removed.")


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=128)
    temperature: float | None = Temperature
    top_p: float | None = TopP
    stop: str | list[str] | None = Field(
        default=None, description="Up to 4 strings; generation stops before any of them."
    )
    seed: int | None = Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Penalty
    frequency_penalty: float | None = Penalty
    n: int | None = Field(default=None, ge=1, description="Only 1 is supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported.")
    user: str | None = None
    ignore_eos: bool = Field(
        default=False,
        description="Extension (as in llama.cpp and vLLM): never stop at end-of-sequence; "
        "for benchmarks.",
    )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="The older name of max_completion_tokens."
    )
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The most tokens the answer may have; give it or max_tokens, not both.",
    )
    response_format: ResponseFormat | None = None
    appliance_grounding: GroundingRequest | None = Field(
        default=None,
        description="Extension: answer from the site's documents, with numbered sources "
        "and checked citations.",
    )
    logprobs: bool | None = Field(
        default=None, description="Return each answer token's log-probability."
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the likeliest tokens at each place.",
    )
    tools: list[Any] | None = Field(default=None, description="Not supported.")
    tool_choice: Any = Field(default=None, description="Not supported.")
    functions: list[Any] | None = Field(default=None, description="Not supported.")
    function_call: Any = Field(default=None, description="Not supported.")
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Each answer token's log-probability and this many likeliest tokens.",
    )
    echo: bool = Field(default=False, description="Only false is supported.")
    best_of: int | None = Field(default=None, ge=1, description="Only 1 is supported.")
    suffix: str | None = Field(default=None, description="Not supported.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Prompt tokens reused from the KV cache instead of being read again."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A chat answer's tokens, each with its log-probability (OpenAI's shape)."""

    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """A completion's tokens, in the legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class RouteTry(BaseModel):
    model: str
    model_sha256: str | None
    answer: str
    confidence: float = Field(description="Geometric mean of the answer tokens' probabilities.")
    threshold: float
    confident: bool
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str


class RouteDecision(BaseModel):
    """Extension, on a route's answer (and a routed stream's last chunk): who answered
    and why; the same is in the answer's audit record."""

    route: str
    answered_by: str = Field(description="The model that answered, or 'referral'.")
    outcome: Literal["specialist", "generalist", "fallback", "referral"]
    domain: str | None = Field(description="The specialist whose domain the question is in.")
    similarities: dict[str, float]
    similarity_threshold: float
    temperature: float = Field(
        description="The temperature every model tried answered at: the route's calibration's."
    )
    tried: list[RouteTry]
    config_sha256: str
    calibration_suite_sha256: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    appliance_route: RouteDecision | None = Field(
        default=None, description="Extension: only on a route's answer."
    )
    appliance_grounding: Grounded | None = Field(
        default=None, description="Extension: only on a grounded answer."
    )


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A completion; also the shape of each streamed event (with usage null)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Kernels(BaseModel):
    variant: str = Field(description="llama.cpp's CPU variant loaded (haswell, zen4, ...).")
    extra_buffers: bool = Field(description="Repacked weights (extra buffer types) in use.")
    cpu_amx: bool = Field(description="The CPU has AMX (whose llama.cpp kernels are avoided).")
    reason: str
    selftest: str = Field(description="What the start-up self-test in a child process saw.")


class Placement(BaseModel):
    gpu_layers: int = Field(description="The setting: layers asked for on the GPU (-1: all).")
    layers: int = Field(description="The model's layers, its output layer counted.")
    offloaded: int = Field(description="Of those, how many run on the GPUs (0: CPU only).")
    devices: list[str] = Field(description="The GPUs they run on, as llama.cpp names them.")
    reason: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    name: str
    file: str
    sha256: str
    format: str
    quantization: str
    parameters: int | None
    context_length: int | None
    domain: str
    license: str
    source: str
    description: str
    size_bytes: int | None
    default: bool
    kind: Literal["chat", "specialist", "embedding", "tensor"] = Field(
        description="What the model does: chat (/v1/chat/completions, /v1/completions), "
        "specialist (the same routes: a base chat model with LoRA adapters, a system "
        "prompt and sampling defaults), embedding (/v1/embeddings) or tensor (/v2)."
    )
    base: str | None = Field(default=None, description="A specialist's base model.")
    adapters: list[dict[str, Any]] | None = Field(
        default=None, description="A specialist's adapters: name, sha256 and scale."
    )
    roles: list[str] | None = Field(
        default=None, description="The roles that may use this specialist (null: all)."
    )
    champion: str | None = Field(
        default=None,
        description="On a served name: the model that answers it now (appliance models promote).",
    )
    pinned: bool = Field(description="Loaded at start and never unloaded.")
    state: Literal["unloaded", "loading", "ready", "unloading", "refused"] = Field(
        description="Models load on their first request and unload when idle past their "
        "keep-alive, or to make room for another."
    )
    reason: str | None = Field(default=None, description="Why the model is refused.")
    memory_bytes: int = Field(description="Memory the model holds when loaded (estimated).")
    keep_alive: int = Field(description="Seconds it stays loaded when idle (-1: no limit).")
    n_ctx: int | None = Field(
        default=None,
        description="The context window of each request (each stream has its own).",
    )
    parallel_streams: int | None = Field(
        default=None, description="Requests this model answers at once."
    )
    kernels: Kernels | None = Field(
        default=None, description="The llama.cpp CPU kernels this model runs on, and why."
    )
    placement: Placement | None = Field(
        default=None,
        description="Where a loaded language model's layers run: on the GPUs, the CPU, or "
        "split (gpu_layers), and why.",
    )


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1, max_length=128)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, or token ids (one list, or a list of lists)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="base64: each vector as little-endian float32 bytes (the openai SDK's "
        "default).",
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Only the model's own dimension count is accepted."
    )
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RouteCard(BaseModel):
    """A route: a name that answers with a specialist, the generalist or a referral."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "appliance"
    kind: Literal["route"] = Field(
        default="route",
        description="Answers chat completions by routing: the specialist whose domain the "
        "question is in, the generalist when none is or the specialist is not confident, "
        "the site's referral message when neither is.",
    )
    domain: str
    description: str
    state: Literal["ready", "uncalibrated"] = Field(
        description="uncalibrated: refused (503) until `appliance route calibrate` has run."
    )
    default: bool = False
    route: dict[str, Any] = Field(
        description="Embedding model, generalist, specialists, roles, calibration."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | RouteCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
