"""The wire contract between the PRS-Med service and its clients.

The service imports these models to validate what it sends and receives, so a client built from this module and
the server can never disagree about a field. Only pydantic here: no torch, no numpy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Zone = Literal["top left", "top right", "bottom left", "bottom right", "center", "none"]
JobState = Literal["queued", "running", "succeeded", "failed", "canceled", "interrupted", "preempted"]
FINAL_JOB_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class MaskRLE(_Model):
    """A mask in COCO's compressed run-length encoding, as pycocotools' ``mask.encode`` writes it (``counts`` as
    text): ``pycocotools.mask.decode({"size": size, "counts": counts.encode()})`` reads it back."""

    size: list[int] = Field(description="[height, width]")
    counts: str


MASK_FORMATS = ("png", "rle")


class PredictResponse(_Model):
    answer: str
    zone: Zone = Field(description="the predicted mask's zone by the authors' rule; 'none' for an empty mask")
    zones: list[str] = Field(default_factory=list, description="one zone per described lesion (two for two lesions)")
    zone_from_text: str = Field(description="the first zone the answer names, or 'none'")
    zones_from_text: list[str] = Field(default_factory=list, description="the zones the answer names; ['none'] "
                                       "when it says there is no lesion, [] when it names none")
    consistent: bool = Field(description="the answer's zones and the mask's are the same set (an answer naming no "
                                         "zone never is)")
    mask_png: str | None = Field(None, description="base64 PNG, 0/255, at the input image's size (mask_format=png, "
                                 "the default)")
    mask_rle: MaskRLE | None = Field(None, description="COCO run-length encoding (mask_format=rle)")
    bbox: list[int] | None = Field(None, description="[x0, y0, x1, y1] inclusive, or null for an empty mask")
    area_fraction: float
    confidence: float = Field(description="mean lesion probability inside the mask; for an empty mask, one minus "
                                          "the highest probability (docs/service.md)")
    image_size: list[int] = Field(default_factory=list, description="[width, height]")
    adapter: str | None = None
    model: str = ""
    cache_hit: bool = False
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ModelInfo(_Model):
    name: str
    revision: str
    description: str
    fingerprint: str
    tags: list[str] = Field(default_factory=list)
    serving: bool = Field(False, description="this is the model the server answers with")


class PluginInfo(_Model):
    name: str
    version: str | None = None
    distribution: str | None = None
    builtin: bool = False
    components: dict[str, list[str]] = Field(default_factory=dict)


class AdapterInfo(_Model):
    name: str
    base_model: str
    base_revision: str
    created_at: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    parts: list[str] = Field(default_factory=list)
    lora: bool = True
    resident: bool = Field(False, description="read into the server's memory, ready to swap in")


class DatasetInfo(_Model):
    id: str
    name: str = ""
    created_at: str = ""
    size_bytes: int = 0
    layout: str = ""
    rows: int = 0
    splits: dict[str, int] = Field(default_factory=dict)
    modalities: dict[str, int] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    content_sha256: str = Field("", description="hash of the dataset's files (paths and bytes): an upload of the "
                                                "same files returns the dataset already stored")
    reused: bool = Field(False, description="this upload's files were already stored: no new dataset was made")


class JobRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    dataset: str = Field(description="a dataset id from POST /v1/datasets")
    base: str = Field("prsmed-tiny", description="zoo model to fine-tune")
    # None: the base model's fine-tuning default (`prsmed zoo show BASE`; the paper's recipe for the 7B model).
    epochs: int | None = Field(None, gt=0, le=1000)
    batch_size: int = Field(8, gt=0, le=1024)
    lr: float | None = Field(None, gt=0, le=1.0)
    name: str | None = Field(None, description="the adapter's name once finished (default: the job id)")
    options: dict[str, Any] = Field(default_factory=dict, description="more `prsmed train` options, e.g. max_steps")


class ValidationScores(_Model):
    """One evaluation of a fine-tuning run on its validation rows. Fractions are of the rows scored; None when
    nothing could be counted (no answer generated, say)."""

    step: int | None = Field(None, description="the optimizer step evaluated; 0 is before training")
    score: float | None = Field(None, description="what picks the best checkpoint: see TrainingReport.score_definition")
    dice_at_05: float | None = Field(None, description="Dice of the mask binarised at 0.5 (prsmed eval's dice@0.5)")
    soft_dice: float | None = Field(None, description="Dice of the mask probabilities")
    zone_acc_text: float | None = Field(None, description="answers naming the ground-truth mask's zones")
    agreement: float | None = Field(None, description="answers naming the predicted mask's zones")
    hit_length_limit: float | None = Field(None, description="answers cut at the generation length limit")
    repeated_words: float | None = Field(None, description="answers with a word repeated back to back")
    well_formed: float | None = Field(None, description="answers neither repeating a word nor cut at the limit; "
                                                        "the score is scaled by it")
    loss_lm: float | None = Field(None, description="LM loss of the reference answers")
    rows: int = Field(0, description="validation rows whose masks were scored")
    answer_rows: int = Field(0, description="validation rows whose generated answers were scored")
    examples: list[str] = Field(default_factory=list, description="the first few generated answers")


class TrainingReport(_Model):
    """How a fine-tuning run did on its validation rows: before training, at its best checkpoint and at its last
    evaluation, which of those weights the adapter holds, and a verdict in plain words."""

    validation: str = Field("", description="where the validation rows came from")
    rows: int = Field(0, description="validation rows; 0 means the run was not judged at all")
    score_definition: str = ""
    kept: Literal["best", "last"] = Field("last", description="the weights the adapter holds")
    before: ValidationScores | None = None
    best: ValidationScores | None = None
    last: ValidationScores | None = None
    answers_worse: bool = Field(False, description="zone_acc_text or agreement of the kept weights fell below before")
    masks_worse: bool = Field(False, description="dice@0.5 of the kept weights fell below before")
    verdict: str = ""
    warnings: list[str] = Field(default_factory=list)


class JobInfo(_Model):
    id: str
    state: JobState
    base: str
    dataset: str
    adapter_name: str
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eta_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    adapter: str | None = Field(None, description="the finished adapter's name, listed in GET /v1/adapters")
    queue_position: int | None = None
    attempts: int = 0
    report: TrainingReport | None = Field(None, description="the run's validation before / best / last and its "
                                          "verdict, set when a worker ends (a resumed attempt clears it)")


class JobEvent(_Model):
    """One server-sent event: ``event`` is its SSE event name, ``data`` its JSON payload."""

    event: Literal["state", "step", "metrics", "end"]
    data: dict[str, Any] = Field(default_factory=dict)


class HubPullRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    ref: str = Field(description="owner/name, owner/name@revision or hf://owner/name@revision")
    force: bool = Field(False, description="download again even if this reference is already in the store")


class HubPushRequest(_Model):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    repo_id: str = Field(description="the Hub model repository, owner/name (created if needed)")
    private: bool = False
    revision: str | None = Field(None, description="branch to commit to (created from main if needed)")
    commit_message: str | None = None


class HubPushResult(_Model):
    repo_id: str
    revision: str
    commit: str
    url: str = ""


class ErrorBody(_Model):
    error: str = Field(description="a short machine-readable kind: invalid_input, not_found, unauthorized, busy, ...")
    message: str
    retry_after_s: float | None = None
    queue_position: int | None = None


class PlanRequest(_Model):
    """``POST /v1/plan``: what ``prsmed plan`` takes, less ``--catalogue`` (the server uses its own)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "prsmed-llava-med-7b"
    precision: Literal["fp32", "bf16", "fp16", "4bit"] = "bf16"
    batch_size: int | None = Field(None, ge=1, le=4096)
    grad_checkpointing: bool = False
    image_size: int | None = Field(None, ge=32, le=4096)
    seq_len: int = Field(80, ge=1, le=32768)
    gpu: str = "all"
    epochs: int = Field(20, ge=1, le=10000)
    dataset_size: int = Field(21040, ge=1)
    mfu: float = Field(0.30, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1, le=4096)


class PlanRow(_Model):
    platform: str | None
    gpu: str
    gpu_label: str = ""
    vram_gb: float
    fits: bool = Field(description="prsmed train can run it on this GPU (a row that needs a 4-bit base never fits)")
    tight: bool = Field(False, description="fits with under 10% of the card's memory left")
    needs: str | None = Field(None, description="options the row needs that were not asked for, e.g. "
                                                "'--grad-checkpointing', '--precision fp16'")
    why: str = ""
    max_batch: int
    recommended_batch: int
    grad_accum: int
    memory_gb: float
    hours: float | None = None
    usd_h: float | None = None
    usd_h_spot: float | None = None
    cost_usd: float | None = None
    cost_usd_spot: float | None = None
    price_source: str | None = None
    notes: list[str] = Field(default_factory=list)


class PlanReport(_Model):
    """The planner's answer; ``memory_gb`` holds the total and its parts (GiB), ``rows`` one GPU offer each."""

    model: str
    options: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    sequence: dict[str, int] = Field(default_factory=dict)
    memory_gb: dict[str, Any] = Field(default_factory=dict)
    flops_per_sample: dict[str, int] = Field(default_factory=dict)
    assumptions: dict[str, Any] = Field(default_factory=dict)
    recommendation: str = ""
    train_command: str | None = Field(None, description="the prsmed train command line of the recommended row")
    rows: list[PlanRow] = Field(default_factory=list)
