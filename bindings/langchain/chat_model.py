"""`ChatM3DB`: a LangChain chat model that answers with memory, through `db.generate`.

Nothing here decodes or recalls: LangChain's messages become m3db's chat messages
[{"role", "content"}] and `db.generate` (the one answer plan, m3db.extend.AnswerPlan) reads
the memories each 64-token chunk recalls and names the sources. The AIMessage carries them
in `response_metadata["sources"]` (each source's id, text, document, title, package), with
the generation mode and the finish reason.

LangChain's stop strings cut the answer at the first one (m3db's stop_tokens are token ids;
the decoder itself stops at the model's end of turn or max_tokens). There is no tool calling,
structured output or streaming by token: db.generate answers whole, and stream() yields that
answer as one chunk.

Imports: dataclasses, m3db.errors and langchain_core.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from m3db.errors import InvalidInputError

# the roles m3db's chat messages take, by LangChain message type
ROLES = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system"}
# db.generate's options that a call may set (invoke(..., k=2), bind(memory="rag"))
CALL_OPTIONS = ("memory", "k", "where", "params", "max_tokens", "temperature", "top_p", "seed")


class ChatM3DB(BaseChatModel):
    """A chat model answering from an m3db knowledge base with its bound model.

    db: an m3db Database (or PackageSet): what db.generate reads and decodes with.
    memory: True/"memory" reads recalled memories, "rag" their text, False/"none" neither.
    k: memories per 64-token chunk (None: the model's, 5); where/params: a recall filter.
    max_tokens, temperature (0: greedy), top_p, seed: db.generate's sampling.
    stop: strings that end the answer (it is cut before the first one).
    model_name (or model=): the name this model reports to LangChain's tracing.
    Each option may also be given per call: `chat.invoke(messages, k=2, stop=["\\n"])`.
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), extra="forbid")

    db: Any = Field(exclude=True)
    model_name: str = Field(default="m3db", alias="model")
    memory: bool | str = True
    k: int | None = None
    where: str | dict | None = None
    params: list | dict | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] | None = None

    @property
    def _llm_type(self) -> str:
        return "m3db"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **{name: getattr(self, name) for name in CALL_OPTIONS}}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="m3db",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stop = stop or self.stop
        if stop:
            params["ls_stop"] = stop
        return params

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager=None, **kwargs: Any
    ) -> ChatResult:
        model = kwargs.pop("model", self.model_name)
        if model != self.model_name:
            raise InvalidInputError(
                f"model={model!r}: this chat model answers with the model its database is bound to "
                f"({self.model_name!r}); open another database for another model"
            )
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise InvalidInputError(
                f"ChatM3DB takes no option {', '.join(map(repr, unknown))}; its options are {', '.join(CALL_OPTIONS)}"
            )
        options = {name: kwargs.get(name, getattr(self, name)) for name in CALL_OPTIONS}
        answer = self.db.generate(chat_messages(messages), **options)
        text, finish = cut(answer.text, stop if stop is not None else self.stop, answer.finish_reason)
        metadata = {
            "model_name": self.model_name,
            "finish_reason": finish,
            "mode": answer.mode,
            "sources": [dataclasses.asdict(s) for s in answer.sources],
        }
        message = AIMessage(content=text, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": finish})])

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager=None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        """The whole answer as one chunk: db.generate does not stream (the server does, over HTTP)."""
        generation = self._generate(messages, stop, run_manager, **kwargs).generations[0]
        message = generation.message
        chunk = AIMessageChunk(
            content=message.content, response_metadata=message.response_metadata, chunk_position="last"
        )
        if run_manager is not None:
            run_manager.on_llm_new_token(message.text, chunk=ChatGenerationChunk(message=chunk))
        yield ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)


def chat_messages(messages: list[BaseMessage]) -> list[dict]:
    """LangChain messages as m3db's chat messages [{"role", "content"}]; a message m3db's models
    cannot read (a tool call or result, an image) is refused, naming it."""
    out = []
    for i, message in enumerate(messages):
        role = message.role if isinstance(message, ChatMessage) else ROLES.get(type(message))
        if role not in ("system", "user", "assistant"):
            raise InvalidInputError(
                f"message #{i} is a {type(message).__name__}"
                + (f" with role {role!r}" if isinstance(message, ChatMessage) else "")
                + ": m3db's models read system, user and assistant text (no tool calling)"
            )
        if isinstance(message, AIMessage) and message.tool_calls:
            raise InvalidInputError(f"message #{i} calls tools: m3db's models have no tool calling")
        content = message.content
        if isinstance(content, list):
            other = [b.get("type") if isinstance(b, dict) else type(b).__name__ for b in content]
            other = [t for t in other if t not in ("text", "str")]
            if other:
                raise InvalidInputError(f"message #{i} holds {other[0]!r} content; m3db's models read text only")
            content = message.text
        out.append({"role": role, "content": content})
    return out


def cut(text: str, stop: list[str] | None, finish_reason: str) -> tuple[str, str]:
    """(the text before the first stop string, finish reason): "stop" where one was found."""
    ends = [text.find(s) for s in stop or () if s and s in text]
    if not ends:
        return text, finish_reason
    return text[: min(ends)], "stop"
