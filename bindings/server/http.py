"""HTTP plumbing shared by the server's endpoints: bounded JSON bodies, error responses,
server-sent events, and noticing a client that went away. Imports: Starlette and the
server's errors.
"""

import asyncio
import json

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .errors import ApiError, bad_request


async def read_json(request: Request, max_bytes: int, timeout: float | None = None):
    """The request's JSON body (read_body's bytes, parsed by parse_json)."""
    return parse_json(await read_body(request, max_bytes, timeout))


async def read_body(request: Request, max_bytes: int, timeout: float | None = None) -> bytes:
    """The request's body, refusing one over max_bytes (413) before reading it all, and one
    that has not all arrived `timeout` seconds after reading began (408: a client that sends
    less than its Content-Length, or drips its body, would hold the connection forever)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"Content-Length {declared!r} is not a number of bytes", "invalid_header")
        if int(declared) > max_bytes:
            raise too_large(int(declared), max_bytes)
    # the Content-Type is not checked: the body is read as JSON whatever it says (`curl -d` says
    # form data), and a body that is not JSON is a 400 saying so
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:  # a chunked body has no Content-Length: count as it comes
                    raise too_large(len(body), max_bytes)
    except ClientDisconnect:
        raise ApiError(499, "the client closed the connection", "client_closed") from None
    except TimeoutError:
        expected = f" of the {declared} bytes its Content-Length announced" if declared is not None else ""
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s (got {len(body)} bytes{expected}); send the "
            "whole body promptly, with a Content-Length that matches it (m3db serve --body-timeout)",
            "request_timeout",
        ) from None
    return bytes(body)


def parse_json(body: bytes):
    """A body's JSON value, or a 400 saying why it is not JSON (or not text)."""
    if not body:
        raise bad_request("the request body is empty; send a JSON object", "invalid_json")
    try:
        value = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {e}", "invalid_json") from None
    try:  # JSON may escape half of a UTF-16 pair ("\ud800"), which is no text and no UTF-8
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise bad_request(
            f"the request body holds a lone UTF-16 surrogate ({e.object[e.start : e.end]!a}), which is not "
            "text: escape characters outside the BMP as a surrogate pair, or send them as UTF-8",
            "invalid_json",
        ) from None
    return value


def refuse_constant(name):
    """NaN and Infinity are not JSON (Python's json would accept them)."""
    raise ValueError(f"{name} is not a JSON value")


def too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is over {size if size > max_bytes else max_bytes} bytes; the limit is {max_bytes} "
        "(m3db serve --max-body-bytes)",
        "request_too_large",
    )


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 429:
        headers = {"Retry-After": "1"}
    if error.status == 408:  # the rest of the body may still come: this connection cannot carry another request
        headers = {"Connection": "close"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def sse(data) -> bytes:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def wait_disconnect(receive) -> None:
    """Return when the client disconnects (the body has been read: only disconnect comes now)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request: Request, work, stop, what: str, *, left=None):
    """The result of `work` (a coroutine run in a worker thread: a statement, an ingest) unless
    the client disconnects first: then `stop("client_closed")`, wait for the work to end (it
    stops at once, and lets go of what it holds), hand its error to `left`, and raise a 499.
    Cancelled (the server is stopping), it calls `stop("shutting_down")`."""
    work = asyncio.ensure_future(work)
    work.add_done_callback(lambda w: w.cancelled() or w.exception())  # read, when no one waits for it
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: the grace ended before the work stopped
        stop("shutting_down")
        raise
    finally:
        gone.cancel()
    if not work.done():
        stop("client_closed")
        try:
            await work
        except Exception as e:
            if left is not None:
                left(e)
        raise ApiError(499, f"the client closed the connection; the {what} was stopped", "client_closed")
    return work.result()


async def next_event(events: asyncio.Queue, gone: asyncio.Future):
    """The next event, or None when the client disconnected first."""
    getter = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None
