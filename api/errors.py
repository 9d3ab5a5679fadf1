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
        ├── InvalidImage             400 invalid_image / empty_file / invalid_base64 / invalid_json
        ├── InvalidRequest           400 invalid_request: a malformed v2 infer body
        ├── Unauthorized             401 unauthorized: API key missing or wrong (API_API_KEY, API_ADMIN_KEY)
        ├── PayloadTooLarge          413 payload_too_large
        ├── ImageTooLarge            413 image_too_large (pixel limit, checked before decoding)
        ├── UnsupportedMediaType     415 unsupported_media_type
        ├── MissingFile              422 missing_file
        ├── NotFound                 404 not_found: no such model or version (the v2 routes)
        ├── ModelLoadRefused         400 model_load_failed / 409 model_load_busy: the served model stays
        ├── NotImplementedHere       501 not_implemented
        ├── ServiceUnavailable       503 not_ready (with Retry-After)
        │   └── Overloaded           503 overloaded: the queue is full (with Retry-After)
        ├── GatewayTimeout           504 timeout: accepted, but not answered within the deadline

Startup errors carry one line that names the setting or file, the bad value and the fix.
Request errors carry a stable `code` for programs and a `message` for people.
"""

from __future__ import annotations

# A process's exit status after a failed start: Gunicorn reads 3 as "worker failed to boot" and stops
# instead of restarting workers that would fail the same way.
EXIT_BAD_CONFIG = 2
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
    """A request the service refuses; mapped to an HTTP answer in one place (`api.main`)."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidImage(RequestError):
    status = 400
    code = "invalid_image"


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


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class MissingFile(RequestError):
    status = 422
    code = "missing_file"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelLoadRefused(RequestError):
    """A model load that did not happen (the served model is untouched): busy (409) or unusable (400)."""

    code = "model_load_failed"

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message, code="model_load_busy" if status == 409 else None)
        self.status = status


class NotImplementedHere(RequestError):
    status = 501
    code = "not_implemented"


class ServiceUnavailable(RequestError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class InferenceFailed(RequestError):
    status = 500
    code = "inference_failed"


class GatewayTimeout(RequestError):
    status = 504
    code = "timeout"


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no message (C++ traces, empty errors)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
