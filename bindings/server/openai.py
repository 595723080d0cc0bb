"""The OpenAI-compatible endpoints: models, chat completions, completions, embeddings.

Requests are checked against the field tables below (fields.py), tokenized
here, and handed to the batcher as jobs; answers come back in OpenAI's shapes, as JSON or as
server-sent events ending with `data: [DONE]`. m3db's additions are extra body fields
(`memory`, `k`, `where`, `params`) and an extra response field, `memories`: the memories the
answer read. `srv` (the app's state: kb, batcher, limits) arrives as an argument.
"""

import asyncio
import base64
import secrets
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from m3db.errors import ContextLengthError, InvalidInputError
from m3db.extend import GENERATION_MODES, MAX_JSON_DEPTH

from .batch import Job
from .errors import ApiError, bad_request, from_m3db
from .fields import Field, nesting_limit, parse
from .http import next_event, read_json, sse, wait_disconnect

# a value bound to a parameter nests lists and objects at most as deep as metadata may (deeper
# is a mistake, and the readers of such values recurse)
PARAMS_DEPTH = nesting_limit(MAX_JSON_DEPTH)

MEMORY_FIELDS = [
    Field(
        "memory",
        ("string",),
        "how the answer uses the knowledge base: read recalled memories (default), put the same "
        "references' text in the prompt (rag), or neither",
        choices=GENERATION_MODES,
    ),
    Field("k", ("integer",), "memories recalled per 64-token chunk (default: the model's, 5)", minimum=1, maximum=64),
    Field(
        "margin",
        ("number", "null"),
        "the relevance gate: of the k recalled, only memories scoring within this of the best are read "
        "(default 0.1; null reads all k)",
        minimum=0,
        maximum=2,
    ),
    Field(
        "where",
        ("string", "object"),
        "a SQL filter over the columns of `memories` (metadata keys are columns), e.g. \"lang = 'en'\", "
        "or an object {column: value}",
    ),
    Field("params", ("array",), "values bound to the ?s of `where`", maximum=64, check=PARAMS_DEPTH),
]


def sampling_fields(max_tokens: int) -> list[Field]:
    return [
        Field("max_tokens", ("integer",), "the longest answer in tokens", minimum=1, maximum=max_tokens),
        Field(
            "temperature", ("number",), "0 is greedy (the default); higher samples more freely", minimum=0, maximum=2
        ),
        Field(
            "top_p",
            ("number",),
            "nucleus sampling: sample from the likeliest tokens holding this mass",
            minimum=0,
            maximum=1,
        ),
        Field(
            "stop",
            ("string", "array", "null"),
            "up to 4 strings that end the answer (not included in it)",
            items="string",
            maximum=4,
        ),
        Field(
            "seed",
            ("integer", "null"),
            "a sampled answer with a seed decodes alone and is reproducible",
            minimum=-(2**63),
            maximum=2**63 - 1,
        ),
        Field("stream", ("boolean",), "answer as server-sent events, ending with `data: [DONE]`"),
        Field(
            "stream_options",
            ("object", "null"),
            '{"include_usage": true} adds a last event with the token counts',
            check=lambda v: (
                None
                if v is None or (set(v) <= {"include_usage"} and isinstance(v.get("include_usage", False), bool))
                else 'only {"include_usage": true or false} is supported'
            ),
        ),
        Field("user", ("string",), "an end-user id (accepted for compatibility; not stored)"),
        Field("n", ("integer", "null"), "choices per prompt", off=(None, 1)),
        Field("presence_penalty", ("number", "null"), "presence penalty", off=(None, 0, 0.0)),
        Field("frequency_penalty", ("number", "null"), "frequency penalty", off=(None, 0, 0.0)),
        Field("logit_bias", ("object", "null"), "logit bias", off=(None, {})),
        Field("logprobs", ("boolean", "integer", "null"), "log-probabilities", off=(None, False, 0)),
    ]


def chat_fields(max_tokens: int) -> list[Field]:
    return [
        Field("model", ("string",), "the served model id (GET /v1/models)", required=True),
        Field(
            "messages",
            ("array",),
            'the conversation: [{"role": "system"|"user"|"assistant", "content": text}]',
            required=True,
            minimum=1,
            maximum=256,
            check=messages_problem,
        ),
        Field("max_completion_tokens", ("integer",), "the same as max_tokens", minimum=1, maximum=max_tokens),
        *sampling_fields(max_tokens),
        Field("top_logprobs", ("integer", "null"), "top log-probabilities", off=(None, 0)),
        Field("tools", ("array", "null"), "tool definitions", off=(None, [])),
        Field("tool_choice", ("string", "null"), "tool choice", off=(None, "none")),
        Field("response_format", ("object", "null"), "response format", off=(None, {"type": "text"})),
        *MEMORY_FIELDS,
    ]


def completion_fields(max_tokens: int, max_prompts: int) -> list[Field]:
    return [
        Field("model", ("string",), "the served model id (GET /v1/models)", required=True),
        Field(
            "prompt",
            ("string", "array"),
            "the text to continue (no chat template), or an array of texts: one choice each",
            required=True,
            items="string",
            minimum=1,
            maximum=max_prompts,
        ),
        *sampling_fields(max_tokens),
        Field("echo", ("boolean", "null"), "echo the prompt", off=(None, False)),
        Field("suffix", ("string", "null"), "text after the completion", off=(None,)),
        Field("best_of", ("integer", "null"), "best of several", off=(None, 1)),
        *MEMORY_FIELDS,
    ]


EMBEDDING_FIELDS = [
    Field("model", ("string",), "the served model id (GET /v1/models)", required=True),
    Field(
        "input",
        ("string", "array"),
        "a text or an array of texts (not token ids)",
        required=True,
        items="string",
        maximum=256,
    ),
    Field(
        "encoding_format",
        ("string",),
        "float (default) or base64 (float32, little-endian)",
        choices=("float", "base64"),
    ),
    Field("dimensions", ("integer",), "must equal the embedder's dimension (vectors are not shortened)", minimum=1),
    Field("user", ("string",), "an end-user id (accepted for compatibility; not stored)"),
]

ROLES = ("system", "developer", "user", "assistant")


def messages_problem(messages) -> str | None:
    """Why a messages array is not one m3db can template, or None."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} must be an object with role and content"
        extra = set(m) - {"role", "content", "name"}
        if extra:
            return f"message {i} has unsupported fields {sorted(extra)} (tool calls are not supported)"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                return f'message {i}: only text content parts ({{"type": "text", "text": ...}}) are supported'
        elif not isinstance(content, str):
            return f"message {i} needs content: a string or an array of text parts"
    return None


def as_messages(messages) -> list[dict]:
    """OpenAI messages as the chat template takes them (text parts joined, developer = system)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(p["text"] for p in content)
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


class OpenAIEndpoints:
    """The handlers of /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings."""

    def __init__(self, srv):
        self.srv = srv
        self.chat_fields = chat_fields(srv.limits.max_tokens)
        self.completion_fields = completion_fields(srv.limits.max_tokens, srv.batcher.max_queue)

    def check_model(self, name) -> None:
        self.srv.check_model(name)

    async def body(self, request: Request, fields) -> dict:
        limits = self.srv.limits
        return parse(await read_json(request, limits.max_body_bytes, limits.body_timeout), fields)

    async def models(self, request: Request) -> JSONResponse:
        """GET /v1/models: the one served knowledge base, as a model."""
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    def model_card(self) -> dict:
        return {"id": self.srv.kb.name, "object": "model", "created": self.srv.started, "owned_by": "m3db"}

    async def model(self, request: Request) -> JSONResponse:
        """GET /v1/models/{model}."""
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    # -- generation --------------------------------------------------------------------------

    async def chat(self, request: Request):
        """POST /v1/chat/completions."""
        body = await self.body(request, self.chat_fields)
        self.check_model(body["model"])
        if (
            "max_tokens" in body
            and "max_completion_tokens" in body
            and body["max_tokens"] != body["max_completion_tokens"]
        ):
            raise bad_request("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
        if "max_completion_tokens" in body:
            body["max_tokens"] = body["max_completion_tokens"]
        messages = as_messages(body["messages"])
        model = await run_in_threadpool(self.srv.kb.model)

        def tokenize():
            try:
                text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as e:  # a model file without a chat template: completions still work
                raise bad_request(f"{e}; use /v1/completions", "no_chat_template", "messages") from e
            return [model.tokenizer.encode(text)]

        return await self.generate(request, body, model, tokenize, chat=True)

    async def completions(self, request: Request):
        """POST /v1/completions."""
        body = await self.body(request, self.completion_fields)
        self.check_model(body["model"])
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        body.setdefault("max_tokens", 16)  # OpenAI's default for completions
        model = await run_in_threadpool(self.srv.kb.model)

        def tokenize():
            return [model.tokenizer.encode(p) for p in prompts]

        return await self.generate(request, body, model, tokenize, chat=False)

    async def generate(self, request, body, model, tokenize, *, chat: bool):
        kb, limits = self.srv.kb, self.srv.limits
        where, params = body.get("where"), body.get("params")
        if body.get("stream_options") is not None and not body.get("stream"):
            raise bad_request("stream_options applies to a streamed answer; send stream: true", param="stream_options")
        gate = {"margin": body["margin"]} if "margin" in body else {}  # absent: the engine's default
        plan = await run_in_threadpool(
            engine_checked,
            kb.plan,
            memory=body.get("memory", "memory"),
            k=body.get("k"),
            where=where,
            params=params,
            **gate,
        )
        if plan.mode != "none" and (where is not None or params is not None):
            # SQL from the client: run once here under the statement time limit (recalls during
            # generation read its result from the filter cache)
            await run_in_threadpool(self.srv.sql.filtered, kb.check_filter, where, params)
        prompt_ids = await run_in_threadpool(tokenize)
        if any(not ids for ids in prompt_ids):
            raise bad_request("the prompt is empty: give at least one token of text", param="prompt")
        asked = body.get("max_tokens")
        try:
            plan.check_context([len(ids) for ids in prompt_ids], asked)
        except ContextLengthError as e:
            raise ApiError(400, from_m3db(e).message, "context_length_exceeded", param="messages" if chat else "prompt")
        # a request that names no max_tokens gets the default, or the room its prompt leaves
        longest = max(len(ids) for ids in prompt_ids)
        max_tokens = asked if asked is not None else max(1, min(limits.default_max_tokens, plan.room() - longest))
        stop = body.get("stop") or []
        events = asyncio.Queue()
        jobs = [
            Job(
                events,
                i,
                ids,
                plan=plan,
                max_tokens=max_tokens,
                temperature=temperature(body),
                top_p=float(body.get("top_p", 1.0)),
                seed=body.get("seed"),
                stop=[stop] if isinstance(stop, str) else stop,
            )
            for i, ids in enumerate(prompt_ids)
        ]
        self.srv.batcher.submit(jobs)
        gone = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            first = await next_event(events, gone)
        except BaseException:
            gone.cancel()
            cancel(jobs)
            raise
        if first is None:
            cancel(jobs)
            raise ApiError(499, "the client closed the connection", "client_closed")
        if first[1] == "error":
            gone.cancel()
            cancel(jobs)
            raise first[2]
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            "created": int(time.time()),
            "model": kb.name,
        }
        if body.get("stream"):
            gone.cancel()  # the streaming response notices a disconnect itself (its writes fail)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self.stream(jobs, events, first, head, chat=chat, include_usage=include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            results = await self.collect(jobs, events, first, gone)
        finally:
            gone.cancel()
        return JSONResponse(self.answer(results, head, chat=chat, mode=plan.mode))

    async def collect(self, jobs, events, first, gone) -> list[dict]:
        results = [None] * len(jobs)
        event = first
        while True:
            if event is None:
                cancel(jobs)
                raise ApiError(499, "the client closed the connection", "client_closed")
            index, kind, value = event
            if kind == "error":
                cancel(jobs)
                raise value
            if kind == "done":
                results[index] = value
                if all(r is not None for r in results):
                    return results
            event = await next_event(events, gone)

    def answer(self, results, head, *, chat: bool, mode: str) -> dict:
        usage = usage_of(results)
        if chat:
            r = results[0]
            choices = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r["text"]},
                    "finish_reason": finish_reason(r["finish_reason"]),
                    "logprobs": None,
                }
            ]
        else:
            choices = [
                {
                    "index": i,
                    "text": r["text"],
                    "finish_reason": finish_reason(r["finish_reason"]),
                    "logprobs": None,
                    "memories": r["memories"],
                }
                for i, r in enumerate(results)
            ]
        return {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": usage,
            "memory": mode,
            "memories": merged_memories(results),
        }

    async def stream(self, jobs, events, first, head, *, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        results = [None] * len(jobs)

        def chunk(index, piece=None, finish=None, **extra):
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": None}
            out = {**head, "object": obj, "choices": [choice], **extra}
            if include_usage:
                out["usage"] = None
            return sse(out)

        try:
            if chat:
                opening = {
                    **head,
                    "object": obj,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ],
                }
                if include_usage:
                    opening["usage"] = None
                yield sse(opening)
            event = first
            while True:
                index, kind, value = event
                if kind == "error":
                    yield sse(value.body())
                    break
                if kind == "delta":
                    yield chunk(index, value)
                else:
                    results[index] = value
                    yield chunk(index, None, finish_reason(value["finish_reason"]), memories=value["memories"])
                    if all(r is not None for r in results):
                        if include_usage:
                            yield sse({**head, "object": obj, "choices": [], "usage": usage_of(results)})
                        break
                event = await events.get()
            yield sse("[DONE]")
        finally:
            cancel(jobs)  # a client gone mid-stream (or any early exit) stops its rows

    # -- embeddings --------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> JSONResponse:
        """POST /v1/embeddings: the knowledge base's retrieval embedder."""
        body = await self.body(request, EMBEDDING_FIELDS)
        self.check_model(body["model"])
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        if not texts or any(not t.strip() for t in texts):
            raise bad_request("input needs at least one text, and no empty ones", param="input")
        dim = self.srv.kb.spec.embedding_dim
        if body.get("dimensions", dim) != dim:
            raise bad_request(f"dimensions={body['dimensions']}: this embedder gives {dim}", param="dimensions")
        vectors = await run_in_threadpool(self.srv.kb.embed, texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        tokens = await run_in_threadpool(self.srv.kb.embedding_tokens, texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.srv.kb.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def engine_checked(make, **options):
    """`make(**options)`, with the engine's refusal of an option (InvalidInputError naming it)
    answered as a 400 naming that request field."""
    try:
        return make(**options)
    except InvalidInputError as e:
        if e.option is None:
            raise
        raise bad_request(from_m3db(e).message, param=e.option) from e


# below this, sampling is greedy decoding (its limit as the temperature goes to 0), and
# dividing float32 logits by it would overflow to inf and NaN probabilities
GREEDY_BELOW = 1e-5


def temperature(body) -> float:
    t = float(body.get("temperature", 0.0))
    return 0.0 if t < GREEDY_BELOW else t


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason for the decoder's: "length" when max_tokens cut the answer,
    "stop" for every other end (the stop token, a stop string, or the model ending its turn
    before any text, which m3db's own Answer calls "empty")."""
    return "length" if reason == "length" else "stop"


def cancel(jobs) -> None:
    for job in jobs:
        job.cancel()


def usage_of(results) -> dict:
    """OpenAI's usage, plus `timings`: where the time went, in milliseconds (Answer.timings;
    of several prompts, the slowest's)."""
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    timings = max((r.get("timings") or {} for r in results), key=lambda t: t.get("total", 0), default={})
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {**usage, "timings": timings} if timings else usage


def merged_memories(results) -> list[dict]:
    """Every memory the answers read, in order of first use, each once."""
    seen, out = set(), []
    for r in results:
        for m in r["memories"]:
            key = (m.get("package"), m["id"])
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out
