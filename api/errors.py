"""Every error this service raises on purpose, in one tree.

    CatBreedsError
    ├── StartupError                 stops the process before it reports ready
    │   ├── ConfigError              a setting has a bad value (or asks for what this host cannot run)
    │   └── ModelLoadError           the checkpoint cannot become a working classifier
    │       ├── CheckpointNotFound
    │       ├── CheckpointUnreadable
    │       ├── UnsafeCheckpoint     the file would have to run code to load
    │       └── CheckpointMismatch   weights, architecture, classes or labels disagree
    └── RequestError                 answered as {"error": {"code", "message"}} with `status`
        ├── InvalidImage             400 invalid_image: not a decodable image
        │   ├── EmptyFile            400 empty_file
        │   ├── InvalidMultipart     400 invalid_multipart: a malformed multipart body
        │   ├── InvalidJson          400 invalid_json: a JSON body that does not parse
        │   └── InvalidBase64        400 invalid_base64: the JSON body's image is not base64
        ├── InvalidRequest           400 invalid_request: a malformed v2 infer or load body
        ├── ModelLoadRefused         400 model_load_failed: the swap cannot serve; the served model stays
        │   └── ModelLoadBusy        409 model_load_busy: another load is running
        ├── Unauthorized             401 unauthorized: API key missing or wrong (API_API_KEY, API_ADMIN_KEY)
        ├── NotFound                 404 not_found: no such route, model or version
        ├── MethodNotAllowed         405 method_not_allowed
        ├── PayloadTooLarge          413 payload_too_large: the body is over its limit (API_MAX_UPLOAD_MB)
        ├── ImageTooLarge            413 image_too_large: the canvas is over API_MAX_IMAGE_PIXELS
        │   └── ImageTooCostly       413 image_too_costly: decoding would cost over API_DECODE_BUDGET_MP
        ├── UnsupportedMediaType     415 unsupported_media_type
        ├── MissingFile              422 missing_file
        ├── ValidationFailed         422 validation_error: a query or form parameter is invalid
        ├── HttpError                4xx http_error: any other refusal by the web framework
        ├── InternalError            500 internal_error: a bug (the traceback is logged; never its text)
        ├── InferenceFailed          500 inference_failed: the forward pass raised
        ├── NotImplementedHere       501 not_implemented
        ├── ServiceUnavailable       503 not_ready (with Retry-After)
        │   ├── Overloaded           503 overloaded: the queue is full (with Retry-After)
        │   └── ExplainBusy          503 explain_busy: API_MAX_EXPLANATIONS are in progress (with Retry-After)
        └── GatewayTimeout           504 timeout: accepted, but not answered within the deadline

The codes above are the only ones a response carries (tests/unit/test_errors.py holds them to it).
Startup errors carry one line that names the setting or file, the bad value and the fix.
Request errors carry a stable `code` for programs and a `message` for people.
"""

from __future__ import annotations

# Exit statuses, the one table (every process of the service exits with one of these):
EXIT_OK = 0
EXIT_ERROR = 1  # the CLI: a request failed, a server answered an error, a file is missing
EXIT_BAD_CONFIG = 2  # a setting is invalid: fix it and start again (a restart alone fails the same way)
# the model did not load, or the server never started (port taken, failed lifespan); uvicorn's own
# status for a failed start, and what Gunicorn reads as "worker failed to boot": it stops instead
# of restarting workers that would fail the same way
EXIT_LOAD_FAILED = 3


class CatBreedsError(Exception):
    """Root of every error raised on purpose by this package."""


class StartupError(CatBreedsError):
    """The service cannot start; the message is the one line an operator reads."""


class ConfigError(StartupError):
    """A setting has a value the service cannot run with."""


class ModelLoadError(StartupError):
    """The configured checkpoint cannot be turned into a working classifier."""


class CheckpointNotFound(ModelLoadError):
    """The configured checkpoint path does not exist."""


class CheckpointUnreadable(ModelLoadError):
    """The file exists but is not a checkpoint we can read (truncated, wrong format)."""


class UnsafeCheckpoint(ModelLoadError):
    """The pickle needs arbitrary Python objects; loading it could run code."""


class CheckpointMismatch(ModelLoadError):
    """Weights, architecture, number of classes or class names disagree."""


class RequestError(CatBreedsError):
    """A request the service refuses; mapped to an HTTP answer in one place (`api.http.app`). Each
    class has one status and one code: a new code is a new class, drawn in the tree above."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidImage(RequestError):
    status = 400
    code = "invalid_image"


class EmptyFile(InvalidImage):
    code = "empty_file"


class InvalidMultipart(InvalidImage):
    code = "invalid_multipart"


class InvalidJson(InvalidImage):
    code = "invalid_json"


class InvalidBase64(InvalidImage):
    code = "invalid_base64"


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_request"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class ImageTooLarge(RequestError):
    status = 413
    code = "image_too_large"


class ImageTooCostly(ImageTooLarge):
    code = "image_too_costly"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class MissingFile(RequestError):
    status = 422
    code = "missing_file"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"


class ValidationFailed(RequestError):
    status = 422
    code = "validation_error"


class HttpError(RequestError):
    """A refusal the web framework raised itself with a status this tree has no class for."""

    code = "http_error"

    def __init__(self, message: str, *, status: int, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.status = status


class ModelLoadRefused(RequestError):
    """A model load that did not happen (the served model is untouched): unusable (400) or busy (409)."""

    status = 400
    code = "model_load_failed"


class ModelLoadBusy(ModelLoadRefused):
    status = 409
    code = "model_load_busy"


class NotImplementedHere(RequestError):
    status = 501
    code = "not_implemented"


class ServiceUnavailable(RequestError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str, *, retry_after_s: int = 5):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class ExplainBusy(ServiceUnavailable):
    code = "explain_busy"


class InternalError(RequestError):
    status = 500
    code = "internal_error"


class InferenceFailed(RequestError):
    status = 500
    code = "inference_failed"


class GatewayTimeout(RequestError):
    status = 504
    code = "timeout"

    @classmethod
    def unanswered(cls, timeout_s: float) -> GatewayTimeout:
        """The answer both serving objects give a request that waited out its deadline."""
        return cls(f"no answer within the request deadline (API_REQUEST_TIMEOUT_S={timeout_s:g})")


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no message (C++ traces, empty errors)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
