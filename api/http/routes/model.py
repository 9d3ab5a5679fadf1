"""What is being served: architecture, classes, preprocessing, device and checkpoint identity."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.http.deps import StateDep, require_api_key
from api.http.schemas import ErrorResponse, ModelInfo

router = APIRouter(prefix="/api/v1", tags=["model"], dependencies=[Depends(require_api_key)])


@router.get(
    "/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorResponse, "description": "Model not ready."}},
    summary="Model information",
)
async def model_info(state: StateDep) -> ModelInfo:
    """Architecture, class names, resolved preprocessing, device, runtime and precision, checkpoint path and
    sha256, and the limits it serves under: the same description as the ready log line."""
    described = state.require_ready().describe()
    return ModelInfo(**{name: described[name] for name in ModelInfo.model_fields})
