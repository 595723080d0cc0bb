"""The server's errors: `ApiError`, and m3db's errors turned into OpenAI's error shape.

Every failure a client sees is `{"error": {"message", "type", "code"}}` with a 4xx status for
anything the client can fix, and a 5xx only for the server's own trouble (a damaged file, a
full disk). Imports: the m3db error tree only.
"""

from m3db.errors import M3DBError

# m3db's stable error codes (docs/errors.md) -> HTTP status. Bad input is always 4xx; only
# bytes on disk (format), the disk itself (storage) and the server's own state (closed) are 5xx.
STATUS = {
    "invalid_input": 400,
    "query": 400,
    "spec_mismatch": 400,
    "duplicate_id": 409,
    "not_found": 404,
    "read_only": 403,
    "locked": 503,
    "closed": 503,
    "missing_dependency": 501,
    "format": 500,
    "storage": 500,
}

# OpenAI's error `type` for each status family
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    501: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error answered to the client: HTTP status, message, OpenAI error type and a stable code."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.extra = extra or {}  # more fields of the error object (m3db's additions, e.g. `stored`)

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        """The JSON body, in OpenAI's shape."""
        error = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        return {"error": {**error, **self.extra}}


def bad_request(message: str, code: str = "invalid_value", param: str | None = None) -> ApiError:
    """A 400 for input the client must fix."""
    return ApiError(400, message, code, param=param)


def from_m3db(e: M3DBError) -> ApiError:
    """An engine error as the client sees it: its message without the `[code]` prefix, the
    status its code maps to, and the code itself (documented in docs/errors.md)."""
    text = str(e)
    prefix = f"[{e.code}] "
    message = text[len(prefix) :] if text.startswith(prefix) else text
    return ApiError(STATUS.get(e.code, 500), message, e.code)
