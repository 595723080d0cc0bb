"""The generation queue: answers one at a time through the engine's one road, a bounded wait.

An answer is `knowledge.generate(question, ...)` (Database.generate or PackageSet.generate: the
answer plan every surface shares), never an orchestration of this binding's own. The decoder
answers one question at a time here (an MCP client asks one question per tool call, and the
HTTP server is the place for batched decoding); at most `max_queue` calls wait or run, and one
more is refused at once, as `m3db serve --max-queue` refuses it. A call cancelled while it waits
is never decoded. Imports: this binding's errors.
"""

import threading

from .errors import Refusal


class Ticket:
    """One call's place in the queue; `cancel()` before its turn means it is never decoded."""

    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class Generation:
    """Answers from `knowledge` (a Database or a PackageSet), one at a time, at most `max_queue`
    calls waiting or running; `stop()` refuses new ones and waits for the running one."""

    def __init__(self, knowledge, *, max_queue: int):
        self.knowledge, self.max_queue = knowledge, max_queue
        self.lock = threading.Lock()  # guards the counts below
        self.turn = threading.Lock()  # held by the one answer being decoded
        self.queued = 0  # calls waiting for their turn or decoding
        self.stopping = False

    def answer(self, ticket: Ticket, question: str, **options):
        """The Answer to `question` (Database.generate's options). Runs in a worker thread."""
        with self.lock:
            if self.stopping:
                raise Refusal("the server is shutting down; the question was not answered")
            if self.queued >= self.max_queue:
                raise Refusal(
                    f"the server is busy: {self.queued} questions are waiting or being answered, at most "
                    f"{self.max_queue} (m3db mcp --max-queue); ask again after a moment"
                )
            self.queued += 1
        try:
            with self.turn:
                if ticket.cancelled.is_set():
                    raise Refusal("the call was cancelled before its turn; the question was not answered")
                if self.stopping:
                    raise Refusal("the server is shutting down; the question was not answered")
                return self.knowledge.generate(question, **options)
        finally:
            with self.lock:
                self.queued -= 1

    def stop(self, timeout: float) -> bool:
        """Refuse new questions and wait up to `timeout` seconds for the one being answered;
        False when it is still running then."""
        with self.lock:
            self.stopping = True
        if not self.turn.acquire(timeout=timeout):
            return False
        self.turn.release()
        return True
