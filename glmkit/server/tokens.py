"""POST /tokenize and POST /detokenize, in llama.cpp server's shapes:

    /tokenize   {"content": str, "add_special": false, "parse_special": true, "with_pieces": false}
                -> {"tokens": [id, ...]}, or with_pieces: {"tokens": [{"id": id, "piece": str | [bytes]}, ...]}
                (a piece that is not whole UTF-8 -- part of a character -- is given as its byte values)
    /detokenize {"tokens": [id, ...]} -> {"content": str}   (special tokens written out, as llama.cpp does)

add_special adds what the tokenizer's official encode() adds ([gMASK] <sop> for ChatGLM2/3 and GLM-4, [gMASK]
<sop> at the end for ChatGLM-6B); parse_special reads special-token text in `content` as the token (the
official encode's behaviour); false: as ordinary text.
"""
from __future__ import annotations

from fastapi import Request

from . import schemas
from .schemas import APIError


def piece(tok, tid: int):
    """One token's text, or its bytes where they are not whole UTF-8 (llama.cpp's with_pieces)."""
    if tid in tok.special_ids:
        return tok.id_to_special[tid]
    enc = getattr(tok, "enc", None)                     # GLM-4 (tiktoken): byte-level tokens
    if enc is not None and tid < getattr(tok, "n_ranks", 0):
        raw = enc.decode_single_token_bytes(tid)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)
    return tok.decode([tid], skip_special_tokens=False)


def tokenize(tok, r) -> list:
    if r.parse_special:
        return tok.encode(r.content, add_special_tokens=r.add_special)
    if r.add_special:
        raise APIError(400, "add_special with parse_special false is not supported: the special tokens come from "
                            "the official encode(), which reads special-token text", param="parse_special",
                       code="invalid_value")
    return tok.encode_plain(r.content)


def install(app, core) -> None:
    tok, vocab = core.pipe.tokenizer, core.pipe.config.vocab_size

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        core.auth(request)
        r = schemas.parse(schemas.TokenizeRequest, await request.body())
        ids = tokenize(tok, r)
        if r.with_pieces:
            return {"tokens": [{"id": i, "piece": piece(tok, i)} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        core.auth(request)
        r = schemas.parse(schemas.DetokenizeRequest, await request.body())
        bad = [i for i in r.tokens if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is not in this model's vocabulary [0, {vocab})", param="tokens",
                           code="invalid_value")
        return {"content": tok.decode(r.tokens, skip_special_tokens=False)}
