"""The batcher: generation requests that arrive together are decoded together.

The decoder's loop (m3db.model.generate) decodes a batch of prompts in one forward per step,
left-padded, and gives the same tokens as decoding each alone (tests/model/test_model_generate.py
checks it). It shares one retriever, one sampling setting and one random stream across its
rows, and a batch cannot take new rows once started. So requests are grouped by what a batch
shares (memory mode, k, filter, temperature, top_p), up to `max_batch` per batch: the worker
thread takes the oldest request's group from the queue, waiting while more keep arriving (up
to 0.1 s) when the queue is short, and decodes it. Requests arriving meanwhile queue for the
next batch (static batching: a batch runs until its last row ends). Each row keeps its own
max_tokens and stop strings: the batch runs to the longest max_tokens, a row that is done is
no longer read, and its answer is sent as soon as it ends. A sampled request with a `seed`
decodes alone, so its seed reproduces its answer.

A full queue answers 429. A client that disconnects cancels its job; a batch whose rows are
all done or cancelled stops at once. In rag mode the references' text is known only once
recalled, while decoding: a row whose references do not fit beside its prompt and max_tokens
is a 400 context_length_exceeded, and its companions decode again alone. Imports: the model's
generation loop (this module is only imported by the server, which needs the model extra
anyway) and the server's errors.
"""

import asyncio
import collections
import json
import logging
import secrets
import threading
import time

from m3db.errors import M3DBError
from m3db.model.generate import ContextTooLong, Sampling, run

from .errors import ApiError, bad_request, from_m3db

log = logging.getLogger("m3db.server")


class Job:
    """One generation request and what the worker reports back to it.

    Built on the server's event loop. The worker thread pushes (index, kind, value) events onto
    `events` (an asyncio queue, which several jobs of one request may share): ("delta", text)
    pieces, then exactly one of ("done", result) or ("error", ApiError): `answered` says it
    was sent, and the worker makes sure every job it took is answered, whatever fails.
    """

    def __init__(
        self,
        events: asyncio.Queue,
        index: int,
        prompt_ids,
        *,
        plan,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
    ):
        self.loop, self.events, self.index = asyncio.get_running_loop(), events, index
        self.prompt_ids, self.plan = list(prompt_ids), plan
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.stops = tuple(s for s in stop if s)
        self.cancelled = False
        self.ids: list[int] = []
        self.text, self.sent, self.finish = "", 0, None
        self.reported = False
        self.answered = False
        self.arrived = time.perf_counter()  # Answer.timings' total counts from here: the queue is felt too
        alone = temperature > 0 and seed is not None  # a seeded sample must not share a random stream
        # a batch shares one plan: the requests in it asked for the same mode, k and filter
        shared = (plan.mode, plan.k, plan.margin, json.dumps(plan.where), json.dumps(plan.params))
        self.key = (*shared, temperature, top_p, id(self) if alone else None)

    def cancel(self) -> None:
        """The client is gone: the worker stops decoding this row (and the batch, if it was the last)."""
        self.cancelled = True

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))

    def fail(self, error: ApiError) -> None:
        if self.answered:
            return
        self.answered = True
        self.finish = "error"
        self.emit("error", error)

    def restart(self) -> None:
        """Forget a failed batch's progress (nothing was sent yet), to decode again alone."""
        self.ids, self.text, self.sent, self.finish, self.reported = [], "", 0, None, False

    # -- the worker's side -----------------------------------------------------------------------

    def step(self, token, tokenizer) -> None:
        """Take this row's token of one step (None: the model's stop token ended it)."""
        if self.finish:
            return
        if self.cancelled:
            self.finish = "cancelled"
            return
        if token is None:
            self.end("stop", tokenizer)
            return
        self.ids.append(token)
        text = tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
            cut = self.stop_at(text)
            if cut is not None:
                self.text = text[:cut]
                self.end("stop", tokenizer, decoded=True)
                return
            self.text = text
            safe = len(text) - held_back(text, self.stops)
            if safe > self.sent:
                self.emit("delta", text[self.sent : safe])
                self.sent = safe
        if len(self.ids) >= self.max_tokens:
            self.end("length", tokenizer)

    def stop_at(self, text: str) -> int | None:
        """Where the first stop string starts in text, or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def end(self, reason: str, tokenizer, *, decoded: bool = False) -> None:
        if not decoded:
            text = tokenizer.decode(self.ids)
            cut = self.stop_at(text)
            self.text, reason = (text, reason) if cut is None else (text[:cut], "stop")
        if len(self.text) > self.sent:
            self.emit("delta", self.text[self.sent :])
            self.sent = len(self.text)
        self.finish = reason


def held_back(text: str, stops) -> int:
    """How many characters at the end of text could begin a stop string (not sent yet)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Batcher:
    """The queue of generation jobs and the worker thread that decodes them in batches."""

    def __init__(self, kb, *, max_batch: int = 8, max_queue: int = 64, window: float = 0.01, max_wait: float = 0.1):
        self.kb, self.max_batch, self.max_queue = kb, max_batch, max_queue
        self.on_answer = None  # called with each finished answer's result (the app's metrics)
        self.window, self.max_wait = window, max_wait
        self.cv = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.stopping = False
        # every key from the start: stats() copies the counter while the worker adds to it, and
        # a key added mid-copy would change the dict's size under the copy
        self.counts = collections.Counter(
            dict.fromkeys(("requests", "batches", "largest_batch", "tokens", "cancelled", "refused"), 0)
        )
        self.thread = threading.Thread(target=self.work, name="m3db-decoder", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: a 429 when the queue is full, a 503 when stopping."""
        with self.cv:
            if self.stopping:
                raise ApiError(503, "the server is shutting down; retry against a running server", "shutting_down")
            if not self.thread.is_alive():  # cannot happen short of a bug; never queue for no one
                raise ApiError(503, "the generation worker stopped; see the server's log and restart it", "no_worker")
            if len(self.pending) + len(self.running) + len(jobs) > self.max_queue:
                self.counts["refused"] += 1
                raise ApiError(
                    429,
                    f"the server is busy: {len(self.pending) + len(self.running)} generation requests are queued "
                    f"or running, at most {self.max_queue} (m3db serve --max-queue); retry after a moment",
                    "queue_full",
                )
            self.pending.extend(jobs)
            self.counts["requests"] += len(jobs)
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return dict(self.counts, queued=len(self.pending), running=len(self.running))

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the queued ones, cancel the running batch, wait for the worker."""
        with self.cv:
            self.stopping = True
            for job in self.pending:
                job.fail(ApiError(503, "the server is shutting down", "shutting_down"))
            self.pending.clear()
            for job in self.running:
                job.cancel()
            self.cv.notify_all()
        self.thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------

    def work(self) -> None:
        while True:
            with self.cv:
                while not self.pending and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                short = len(self.pending) < self.max_batch
            if short:
                self.gather()
            with self.cv:
                if self.stopping:
                    return
                batch = self.take()
                self.running = batch
            try:
                if batch:
                    self.decode(batch)
            except Exception as e:  # a bug or a failed recall: fail its requests, never the worker
                self.recover(batch, e)
            finally:
                for job in batch:  # every job taken is answered, whatever failed above
                    if self.stopping and not job.answered:
                        job.fail(ApiError(503, "the server is shutting down", "shutting_down"))
                    elif not job.answered and not job.cancelled:
                        job.fail(ApiError(500, "generation failed; see the server's log", "server_error"))
                with self.cv:
                    self.running = []

    def recover(self, batch: list[Job], error: Exception) -> None:
        """A batch failed. A request must not fail for its companions: when several rows
        shared the batch, each row that has sent nothing yet decodes again alone (so only the
        row that fails alone fails); a row that already streamed text cannot restart, and fails."""
        if len(batch) == 1:
            self.fail(batch[0], error)
            return
        log.warning("a batch of %d failed (%s: %s); decoding its rows alone", len(batch), type(error).__name__, error)
        for job in batch:
            if job.answered or job.cancelled:
                continue
            if job.sent:
                if isinstance(error, ContextTooLong):  # maybe a companion's references: say so
                    error = ContextTooLong(
                        f"{error} (this answer was decoded beside {len(batch) - 1} other request(s) and had sent "
                        "text already, so it could not be decoded again alone)"
                    )
                self.fail(job, error)
                continue
            job.restart()
            try:
                self.decode([job])
            except Exception as e:
                self.fail(job, e)

    def fail(self, job: Job, error: Exception) -> None:
        if isinstance(error, ContextTooLong):
            # in rag mode the references' text is known only once recalled, while decoding: when
            # it does not fit beside the prompt and max_tokens, the loop says so (k, prompt, max_tokens)
            job.fail(bad_request(str(error), "context_length_exceeded"))
        elif isinstance(error, M3DBError):
            job.fail(from_m3db(error))
        else:
            log.error("generation failed", exc_info=error)
            job.fail(ApiError(500, f"generation failed ({type(error).__name__}); see the server's log", "server_error"))

    def gather(self) -> None:
        """Let requests sent together arrive together: wait while more keep arriving (each
        `window` seconds), at most `max_wait`, or until a batch is full. Tens of milliseconds
        against seconds of decoding."""
        deadline, seen = time.monotonic() + self.max_wait, -1
        while time.monotonic() < deadline:
            with self.cv:
                n = len(self.pending)
            if n >= self.max_batch or n == seen:
                return
            seen = n
            time.sleep(self.window)

    def take(self) -> list[Job]:
        """The oldest job's group (up to max_batch, oldest first); cancelled jobs are dropped."""
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft()
            self.counts["cancelled"] += 1
        if not self.pending:
            return []
        key = self.pending[0].key
        batch = [j for j in self.pending if j.key == key and not j.cancelled][: self.max_batch]
        for job in batch:
            self.pending.remove(job)
        return batch

    def decode(self, batch: list[Job]) -> None:
        first = batch[0]
        model = self.kb.model()
        reading = first.plan.reading()  # the engine's retriever; it keeps what it handed out
        if first.temperature > 0:
            seed = first.seed if first.seed is not None else secrets.randbelow(2**31)
        else:
            seed = 0
        sampling = Sampling(
            max_tokens=max(j.max_tokens for j in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            stop_tokens=None,
            seed=seed,
        )
        try:
            loop, steps = run(
                model, [j.prompt_ids for j in batch], mode=first.plan.mode, retriever=reading, sampling=sampling
            )
        except ContextTooLong as e:
            if len(batch) > 1:  # the longest max_tokens may not fit beside another's prompt: each alone
                for job in batch:
                    self.decode([job])
                return
            self.fail(first, e)
            return
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(batch))
        tokenizer = model.tokenizer
        try:
            for out in steps:
                for row, (job, token) in enumerate(zip(batch, out)):
                    job.step(token, tokenizer)
                    if job.finish in ("stop", "length") and not job.reported:
                        self.report(job, loop, row, reading)
                if all(job.finish for job in batch):
                    break
        finally:
            steps.close()
            self.counts["tokens"] += sum(len(job.ids) for job in batch)
        for row, job in enumerate(batch):
            if job.finish is None:
                job.end("length", tokenizer)
            if job.finish == "cancelled":
                self.counts["cancelled"] += 1
            elif not job.reported:
                self.report(job, loop, row, reading)

    def report(self, job: Job, loop, row: int, reading) -> None:
        """A finished job's result, sent as soon as its row ends (not when the batch does): its
        text, finish reason, token counts, the memories it read (its row's ChunkMemories in
        `loop`; `reading`: the batch's retriever, None in mode "none") and the timings so far
        (the batch's loop, from the job's arrival)."""
        job.reported = True  # before the work below: a failure there must not report it twice
        ids = []
        for c in loop.chunks[row]:
            # memories recalled after this row's last token (the batch ran on) were not read by it
            if c.kind == "generated" and c.start > 0 and c.start >= len(job.ids):
                continue
            ids.extend(c.memory_ids)
        memories = []
        for source in reading.sources(ids) if reading is not None else []:
            item = {"id": source.id, "document": source.document, "title": source.title, "text": source.text}
            if source.package is not None:
                item["package"] = source.package
            memories.append(item)
        job.answered = True
        result = {
            "text": job.text,
            "finish_reason": job.finish,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.ids),
            "memories": memories,
            "timings": job.plan.timings(loop.timings_ms(), reading, time.perf_counter() - job.arrived),
        }
        job.emit("done", result)
        if self.on_answer is not None:
            try:
                self.on_answer(result)
            except Exception:  # a metric must never fail an answer
                log.exception("recording an answer's metrics failed")
