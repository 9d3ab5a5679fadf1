"""What is being served: architecture, classes, preprocessing, device and checkpoint identity."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import StateDep, require_api_key
from api.schemas import ErrorResponse, ModelInfo

router = APIRouter(prefix="/api/v1", tags=["model"], dependencies=[Depends(require_api_key)])


@router.get(
    "/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorResponse, "description": "Model not ready."}},
    summary="Model information",
)
async def model_info(state: StateDep) -> ModelInfo:
    """Architecture, class names, resolved preprocessing, device, dtype, checkpoint path and sha256."""
    classifier = state.require_ready().classifier
    ckpt = classifier.checkpoint
    return ModelInfo(
        architecture=classifier.architecture,
        num_classes=classifier.num_classes,
        class_names=classifier.class_names,
        labels_source=classifier.labels_source,
        multi_label=classifier.multi_label,
        threshold=classifier.threshold if classifier.multi_label else None,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in classifier.data_config.items()},
        device=str(classifier.device),
        device_reason=classifier.device_reason,
        dtype=str(classifier.autocast or classifier.dtype).removeprefix("torch."),
        checkpoint_path=str(ckpt.path),
        checkpoint_format=ckpt.format,
        checkpoint_sha256=ckpt.sha256,
        weights_key=ckpt.weights_key,
        load_seconds=round(classifier.load_seconds, 3),
    )
