"""Request and response bodies (pydantic v2); they are also the OpenAPI documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

Modality = Literal["text", "audio", "visual"]
Status = Literal["queued", "running", "succeeded", "failed"]


class UtteranceIn(BaseModel):
    """One turn in the canonical utterance shape (docs/data-format.md)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, str_strip_whitespace=True)

    id: str | None = Field(None, max_length=200, description="echoed in results; default utt{index}")
    speaker: str = Field(min_length=1, max_length=200, description="who speaks; any name")
    text: str | None = Field(None, description="transcript of the turn; null marks text absent")
    start: float | None = Field(None, ge=0, description="seconds from the start of the media")
    end: float | None = Field(None, ge=0, description="seconds; after start")
    features: dict[Modality, list[float]] | None = Field(
        None, description="precomputed vectors for bundles trained on inline features (e.g. *-mosi2)"
    )


class ConversationIn(BaseModel):
    """A text conversation (JSON body of POST /v1/conversations, or the multipart transcript)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, max_length=200, description="your conversation id (kept in the result)")
    model: str | None = Field(None, max_length=200, description="bundle name (GET /v1/models); default configured")
    callback_url: AnyHttpUrl | None = Field(None, description="POSTed the finished job")
    utterances: list[UtteranceIn] = Field(min_length=1, description="in spoken order")


class AppendIn(BaseModel):
    """New turns for POST /v1/conversations/{id}/utterances."""

    model_config = ConfigDict(extra="ignore")

    utterances: list[UtteranceIn] = Field(min_length=1)


class UtteranceResult(BaseModel):
    index: int = Field(description="position in the conversation, from 0")
    id: str
    speaker: str
    start: float | None
    end: float | None
    text: str | None
    emotion: str = Field(description="the most probable label")
    distribution: dict[str, float] = Field(description="label -> probability, the bundle's label order, sums to 1")
    modalities: list[Modality] = Field(description="modalities actually used for this utterance")


class ModalityReport(BaseModel):
    supplied: bool = Field(description="the request brought it (media, transcript text or inline vectors)")
    used: bool = Field(description="the bundle used it for at least one utterance")
    reason: str | None = Field(description="why a supplied modality was not used (or a trained one is missing)")


class TranscriptSource(BaseModel):
    """``{"source": "supplied"}``, or what speech recognition made of a media upload without transcript."""

    source: Literal["supplied", "asr"]
    model: str | None = Field(None, description="the speech recognition model, e.g. whisper-tiny.en")
    language: str | None = None
    confidence: float | None = Field(None, description="mean word probability over the transcript, 0..1")
    speakers: Literal["clustered", "unknown"] | None = Field(
        None, description="clustered: told apart by voice (speaker1, speaker2, ...); unknown: not told apart"
    )
    utterance_confidence: list[float] | None = Field(None, description="per utterance, mean word probability")
    speech_seconds: float | None = Field(None, description="seconds of speech found by voice activity detection")


class ConversationResult(BaseModel):
    model: str
    labels: list[str] = Field(description="the bundle's label order")
    utterances: list[UtteranceResult]
    modalities: dict[Modality, ModalityReport]
    transcript: TranscriptSource | None = Field(None, description="where the text came from")
    timings: dict[str, float] = Field(description="seconds per processing stage")


class MediaInfo(BaseModel):
    format: str = Field(description="sniffed container, e.g. mp4, wav")
    duration: float | None = Field(description="seconds")
    size: int = Field(description="bytes")
    has_audio: bool
    has_video: bool


class Links(BaseModel):
    self: str
    utterances: str


class JobOut(BaseModel):
    """A conversation job: its status and, once succeeded, the result."""

    id: str
    status: Status
    model: str
    created_at: float
    updated_at: float
    attempts: int
    n_utterances: int
    media: dict[str, MediaInfo] = Field(default_factory=dict)
    result: ConversationResult | None = None
    error: dict | None = Field(None, description="problem+json of a failed job")
    links: Links


class AppendOut(BaseModel):
    """The new utterances scored in the context of the earlier ones."""

    id: str
    model: str
    labels: list[str]
    utterances: list[UtteranceResult]
    modalities: dict[Modality, ModalityReport]
    timings: dict[str, float]


class AppendJob(BaseModel):
    """An append job (the 202 of an append still queued or running after ?wait, and what
    ``links.self`` answers): queued, running, succeeded with the new turns, or failed with why."""

    id: str = Field(description="the conversation's id")
    append_id: str = Field(description="this append's id (links.self)")
    status: Status
    created_at: float
    updated_at: float
    attempts: int
    n_utterances: int = Field(description="turns this append brought")
    result: AppendOut | None = Field(None, description="the new utterances scored in context, once succeeded")
    error: dict | None = Field(None, description="problem+json of a failed append")
    links: dict[str, str] = Field(description="self (poll this) and conversation")


class ModelOut(BaseModel):
    name: str
    architecture: str
    labels: list[str]
    modalities: list[Modality]
    feature_spec: dict[str, dict]
    dev_metrics: dict[str, float | None]
    dataset: str | None
    licence: str | None = Field(None, description="terms inherited from the training corpora (RAVDESS: non-commercial)")
    non_commercial: bool = Field(False, description="true when a training corpus forbids commercial use")
    default: bool
    loaded: bool


class ModelsOut(BaseModel):
    default: str
    models: list[ModelOut]
