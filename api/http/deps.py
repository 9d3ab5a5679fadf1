"""Request-scoped access to what the app was built with (FastAPI dependencies).

All `async def`: they never block, and FastAPI runs a plain `def` dependency in its thread pool,
a thread hop per dependency per request that the event loop pays for under load.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from api.config import HttpSettings
from api.errors import Unauthorized
from api.http.metrics import Metrics
from api.http.readiness import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_http_settings(request: Request) -> HttpSettings:
    return request.app.state.http


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


StateDep = Annotated[ServiceState, Depends(get_state)]
HttpDep = Annotated[HttpSettings, Depends(get_http_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


_API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="API_API_KEY, when it is set.")
_BEARER = HTTPBearer(auto_error=False, description="API_API_KEY as a bearer token, when it is set.")


def _check(given: str | None, expected: SecretStr | None, what: str) -> None:
    if expected is None:
        return
    if given is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"missing or invalid {what}")


async def require_api_key(
    request: Request,
    header_key: Annotated[str | None, Security(_API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """With API_API_KEY set, the request must carry it; compared in constant time. 401 says no more."""
    _check(header_key or (bearer.credentials if bearer else None), request.app.state.http.api_key, "API key")


async def require_admin_key(
    request: Request,
    header_key: Annotated[str | None, Security(_API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """Model management needs API_ADMIN_KEY, sent like the API key (its routes exist only when it is set)."""
    _check(header_key or (bearer.credentials if bearer else None), request.app.state.http.admin_key, "admin key")
