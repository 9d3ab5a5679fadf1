"""The HTTP surface's types: every route answers one of these, so /docs is the reference."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_image, payload_too_large.")
    message: str = Field(description="What went wrong and how to fix it, for people.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Label(BaseModel):
    index: int = Field(description="Output index of the classifier.")
    label: str = Field(description="Class name.")
    score: float = Field(
        ge=0.0,
        le=1.0,
        description="Softmax probability (sigmoid for multi-label), calibrated when a temperature is set or fitted; "
        "for k folds, the mean of theirs.",
    )
    spread: float | None = Field(
        None, description="k folds: the standard deviation of this label's score across the folds; else null."
    )


class ModelIdentity(BaseModel):
    version: str = Field(description="The model version that answered: its checkpoint's short sha256.")
    architecture: str
    num_classes: int
    checkpoint_sha256: str = Field(
        description="SHA-256 of the weights file that answered (k folds: of the folds' own digests, in order)."
    )
    multi_label: bool
    folds: int = Field(description="How many folds answered as one model (1: a single checkpoint).")


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str = Field(description="Format detected from the bytes (JPEG, PNG, ...).")


class Timing(BaseModel):
    decode_ms: float = Field(description="Decode + preprocess, off the event loop.")
    inference_ms: float = Field(description="Forward pass (the whole batch it ran in).")
    total_ms: float = Field(description="From the request body read to the answer.")


class Prediction(BaseModel):
    predictions: list[Label] = Field(description="Best first: the top-k, or every label above the threshold.")
    uncertain: bool = Field(
        description="The top score is below min_confidence (the request's, else API_MIN_CONFIDENCE): "
        "the model is not sure; the labels are still given."
    )
    image: ImageInfo


class ExplanationBody(BaseModel):
    index: int = Field(description="The label explained: the answer's top label.")
    label: str
    heatmap_png: str = Field(
        description="Base64 grayscale PNG the size of the model's input: Grad-CAM of the label (white: the "
        "regions that speak most for it); for k folds, the mean of their maps."
    )
    width: int
    height: int
    box: list[float] = Field(
        description="Where the heatmap lies in the uploaded image: the model's crop as [left, top, right, bottom] "
        "in its pixels (beyond its edges where the crop pads)."
    )
    layer: str = Field(description="The layer explained (timm feature stage).")
    explain_ms: float = Field(description="The explanation's own compute time (PyTorch, one thread).")
    memory_mb: float = Field(description="Resident memory of the process that explains (it loads PyTorch).")


class PredictResponse(Prediction):
    model: ModelIdentity
    timing: Timing
    explanation: ExplanationBody | None = Field(None, description="With explain=true: why the top label.")


class Base64Image(BaseModel):
    """JSON form of an upload for clients that cannot send multipart."""

    image: str = Field(description="Base64 image bytes; a data: URL prefix is accepted.")
    filename: str | None = None


class BatchItem(BaseModel):
    filename: str | None
    ok: bool
    result: Prediction | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order.")
    model: ModelIdentity
    timing: Timing


class EvaluatedCandidate(BaseModel):
    runtime: Literal["torch", "openvino"]
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    img_s: float = Field(description="Images per second at the largest batch, model only, timed at load.")
    top1_agreement: float | None = Field(description="Share of held-out images whose top-1 is PyTorch fp32's.")
    max_abs_dp: float | None = Field(description="Largest difference of any score from PyTorch fp32's.")
    accuracy: float | None = Field(description="Top-1 accuracy on the held-out images (labeled folders).")
    passed: bool | None = Field(description="Whether it passes the gate; null without evaluation images.")


class Evaluation(BaseModel):
    folder: str | None = Field(description="API_EVAL_DIR, or null: speeds only, exact fp32 served under auto.")
    images: int
    labeled: bool
    calibration_images: int = Field(description="The part that calibrates INT8 (never judges it).")
    held_out_images: int = Field(description="The part every candidate is judged on.")
    digest: str | None = None
    min_agreement: float = Field(description="API_MIN_AGREEMENT: the gate's least top-1 agreement.")
    min_held_out: int = Field(description="The gate's least number of held-out images.")
    candidates: list[EvaluatedCandidate]
    chosen: dict[str, str] = Field(description="The candidate that serves: runtime and precision.")
    reason: str


class RecordedScore(BaseModel):
    key: str = Field(description="The checkpoint's key for it (best_metric, val_acc, ...).")
    value: float


class FoldInfo(BaseModel):
    name: str = Field(description="The fold's subfolder (fold_0), or its file's stem.")
    path: str
    sha256: str
    architecture: str
    recorded_score: RecordedScore | None = Field(description="What its checkpoint says it scored in training.")


class ReliabilityBin(BaseModel):
    lower: float
    upper: float
    count: int
    confidence: float = Field(description="Mean top score of the held-out images in this bin.")
    accuracy: float = Field(description="Share of them whose top label is right.")


class CalibrationInfo(BaseModel):
    temperature: float = Field(description="Every score is softmax(log p / temperature); 1: the model's own.")
    source: Literal["fitted", "pinned", "none"] = Field(
        description="fitted on the labeled API_EVAL_DIR's calibration part, pinned (API_TEMPERATURE) or none."
    )
    fit_images: int
    held_out_images: int = Field(description="Labeled held-out images the figures below are measured on.")
    accuracy: float | None
    ece_before: float | None = Field(description="Expected calibration error (15 bins), without the temperature.")
    ece_after: float | None = Field(description="The same, with it.")
    nll_before: float | None = Field(description="Negative log-likelihood per image, without the temperature.")
    nll_after: float | None
    reliability_before: list[ReliabilityBin]
    reliability_after: list[ReliabilityBin]
    confusion: list[list[int]] = Field(description="[true label][answered label] counts on the held-out images.")
    fold_accuracy: list[float] = Field(description="Each fold alone on the held-out images (k folds).")
    reason: str


class ModelInfo(BaseModel):
    architecture: str
    num_classes: int
    class_names: list[str]
    labels_source: str = Field(description="checkpoint, a labels file path, cat-breeds-dataset or generated.")
    multi_label: bool
    threshold: float | None
    preprocessing: dict[str, object] = Field(description="timm data config: input_size, crop_pct, mean, std...")
    device: str
    device_reason: str
    runtime: Literal["torch", "openvino"] = Field(description="What runs the forward pass (API_RUNTIME).")
    runtime_reason: str = Field(description="Why this runtime: the setting, or what API_RUNTIME=auto measured.")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        description="What the forward pass computes in (read from the compiled model on OpenVINO)."
    )
    precision_reason: str
    dtype: str = Field(description="The precision as a dtype name (float32, bfloat16, float16, int8).")
    evaluation: Evaluation | None = Field(
        description="On a CPU: every runtime and precision measured at load, judged on API_EVAL_DIR, and the choice; "
        "null where nothing was measured (a GPU, or one candidate and no evaluation folder)."
    )
    calibration: CalibrationInfo | None = Field(
        description="The temperature applied to every score, and (labeled API_EVAL_DIR) ECE, NLL, accuracy, "
        "reliability diagram and confusion matrix on the held-out images."
    )
    fold_count: int = Field(description="How many folds answer as one model (1: a single checkpoint).")
    folds: list[FoldInfo] = Field(description="Each fold served (one entry for a single checkpoint).")
    runtime_details: dict[str, object] = Field(description="Runtime specifics: threads, CUDA graphs, padding.")
    checkpoint_path: str
    checkpoint_format: str
    checkpoint_sha256: str
    version: str = Field(
        description="The model version answers name: the checkpoint's short sha256 (k folds: a digest over theirs)."
    )
    weights_key: str = Field(description="Which entry of the checkpoint held the weights ('' for a raw one).")
    load_seconds: float
    cpu: str = Field(description="Threads for inference and decoding, and where that number came from.")
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue: int
    request_timeout_s: float
    max_image_pixels: int
    decode_budget_mb: int


class Health(BaseModel):
    status: Literal["loading", "ready", "recovering", "failed", "draining", "stopping"]
    ready: bool
    reason: str | None = Field(None, description="Why the service is not ready.")
    architecture: str | None = None
    device: str | None = None
    uptime_s: float


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


# --- the Open Inference Protocol (v2) ---------------------------------------------------------------


class V2Error(BaseModel):
    error: str = Field(description="What went wrong (tritonclient raises it as InferenceServerException).")


class V2NotReady(BaseModel):
    ready: Literal[False] = False
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The served version: the checkpoint's short sha256.")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, object] | None = None
    data: list[object] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="The version that produced these outputs.")
    id: str | None = None
    outputs: list[InferTensor]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str


class ModelLoaded(BaseModel):
    name: str
    version: str = Field(description="Now serving.")
    previous_version: str
    checkpoint: str
    load_s: float = Field(
        description="Building and checking the new model in a process of its own, then loading and warming it "
        "up beside the old."
    )
    switch_s: float = Field(description="From the switch to every front-end answering with the new model.")
    retire_s: float = Field(description="The old model finishing what was queued for it, then released.")
    total_s: float
    frontends_dropped: int = Field(
        0,
        description="Front-ends disconnected for not confirming the switch within API_REQUEST_TIMEOUT_S "
        "(their event loop was stuck); each connects again by itself and gets the new model.",
    )
