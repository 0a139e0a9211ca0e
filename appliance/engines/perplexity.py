"""Perplexity of a GGUF model over a text, as llama.cpp's llama-perplexity computes it:
the text in windows of ``window`` tokens, each scored on its second half (every token
predicted with at least half a window before it). Used to check that a requantized
file keeps the quality of its source (tests) and to compare formats (bench/formats.py).
"""

from __future__ import annotations

from pathlib import Path


def perplexity(path: Path, text: bytes, threads: int, window: int = 512) -> float:
    import llama_cpp
    import numpy as np

    from appliance.engines import kernels

    kernels.plan()
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp could not load {path}")
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = window
    ctx_params.n_threads = ctx_params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    batch = llama_cpp.llama_batch_init(window, 0, 1)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        buf = (llama_cpp.llama_token * (len(text) + 8))()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
        tokens = list(buf[:n])
        if len(tokens) < window:
            raise ValueError(f"the text is {len(tokens)} tokens; a window is {window}")
        memory = llama_cpp.llama_get_memory(ctx)
        nll, count = 0.0, 0
        for start in range(0, len(tokens) - window + 1, window):
            chunk = tokens[start : start + window]
            llama_cpp.llama_memory_clear(memory, True)
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {path}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), (window, n_vocab))
            for i in range(window // 2, window - 1):
                row = logits[i].astype(np.float64)
                top = row.max()
                nll += float(np.log(np.exp(row - top).sum()) + top - row[chunk[i + 1]])
                count += 1
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return float(np.exp(nll / count))
