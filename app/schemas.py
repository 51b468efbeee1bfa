"""Request and response bodies of the HTTP API (the OpenAPI schema at /docs comes from these)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

NonEmpty = Annotated[str, Strict(), Field(min_length=1)]


class PredictOptions(BaseModel):
    """The per-request options of /predict and /classify: one strict definition of each field, so
    that both routes accept and refuse the same values (no ``"5"`` for 5, no ``true`` for 1)."""

    labels: list[NonEmpty] | None = Field(
        None, min_length=2, strict=True,
        description="class labels, each one token; a named task accepts only its own labels")
    n_samples: int | None = Field(None, ge=1, strict=True, description="posterior samples N (default: the server's)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True,
                             description="seed of this request's posterior samples (default: the server's)")
    return_samples: bool = Field(False, strict=True, description="also return the per-sample probabilities")
    alpha: float | None = Field(None, gt=0.0, lt=1.0, strict=True, description="miscoverage: each prediction "
                                "gets a prediction_set holding the true label with probability >= 1 - alpha")
    max_risk: float | None = Field(None, gt=0.0, lt=1.0, strict=True, description="each prediction gets abstain, "
                                   "so that the error rate among answered inputs is <= max_risk (w.p. >= 1 - delta)")

    @field_validator("alpha", "max_risk", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):  # NaN is neither above 0 nor below 1
            raise ValueError(f"must be a finite number in (0, 1), got {value}")
        return value


class PredictRequest(PredictOptions):
    """Inputs to classify, with optional per-request labels, N and seed."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"inputs": [{"sentence": "a gripping, beautifully acted film"}]},
                                        {"inputs": ["Is the sky blue? Answer:"], "labels": ["yes", "no"],
                                         "n_samples": 16, "seed": 7, "return_samples": False}]})

    adapter: str | None = Field(None, min_length=1, max_length=128,
                                description="the served adapter to answer with (default: the first); see /info")
    inputs: list[NonEmpty | dict[str, Any]] = Field(
        min_length=1,
        description="prompt strings (generic task), or objects with the configured task's fields")


class Prediction(BaseModel):
    id: str = Field(description="unique id of this prediction, for POST /feedback")
    label: str
    index: int
    probs: list[float] = Field(description="mean over samples of the class probabilities, aligned with labels")
    confidence: float = Field(description="max of probs")
    predictive_entropy: float = Field(description="H[mean p] in nats (total uncertainty)")
    expected_entropy: float = Field(description="mean of H[p_n] in nats (aleatoric)")
    mutual_information: float = Field(description="predictive minus expected entropy (epistemic)")
    samples: list[list[float]] | None = Field(None, description="per-sample probabilities (N x C), if asked")
    prediction_set: list[str] | None = Field(None, description="conformal prediction set, if alpha was given")
    abstain: bool | None = Field(None, description="whether to abstain at max_risk, if it was given")


class PredictResponse(BaseModel):
    adapter: str = Field(description="the adapter that answered")
    labels: list[str]
    sigma: float
    n_samples: int
    predictions: list[Prediction]
    conformal: dict[str, Any] | None = Field(None, description="alpha, score, and whether the data support it")
    abstention: dict[str, Any] | None = Field(None, description="max_risk, delta, threshold, and whether supported")


class FeedbackRequest(BaseModel):
    """The true label of an earlier prediction."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"id": "3f2b9c0e5a7d4e1f8a6b2c9d0e1f2a3b",
                                                               "label": "positive"}]})

    id: str = Field(min_length=1, max_length=128, description="the prediction's id")
    label: str | int = Field(description="the true label, as a string of the prediction's labels or an index")


class FeedbackResponse(BaseModel):
    id: str
    label: str
    index: int
    correct: bool
    confidence: float


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str = Field(description="'ready', 'loading', 'failed' or 'draining'")
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str


#: error responses documented on the routes (bodies are ``{"detail": ...}``)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    408: {"model": ErrorBody, "description": "body not received within TFB_BODY_TIMEOUT_S"},
    413: {"model": ErrorBody, "description": "body over TFB_MAX_BODY_BYTES"},
    415: {"model": ErrorBody, "description": "body not JSON (Content-Type) or compressed (Content-Encoding)"},
    422: {"description": "invalid request: unparsable JSON, types, empty or blank inputs, unknown labels, or a limit"},
    431: {"model": ErrorBody, "description": "request headers over TFB_MAX_HEADER_BYTES"},
    429: {"model": ErrorBody, "description": "queue full (Retry-After)"},
    503: {"model": ErrorBody, "description": "not ready, shutting down, or timed out (Retry-After)"},
}


def check_messages(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as a chat template reads them: each with a role, text content (OpenAI's text
    parts joined); a ValueError names the message (also /classify's ``messages``)."""
    for i, m in enumerate(value):
        if not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} has no role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ValueError(f"message {i}: only text content parts are supported")
            m["content"] = "".join(str(p.get("text", "")) for p in content)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of text parts")
    return value
