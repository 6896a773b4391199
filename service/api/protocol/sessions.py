"""Request and response bodies of the session API (HTTP, and the WebSocket messages' payloads)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.native import (
    CORRECTIONS_DESCRIPTION,
    FILTER_DESCRIPTION,
    LEARN_DESCRIPTION,
    MAX_K,
    Int,
    OptInt,
    WordProbability,
    _model_field,
    _Strict,
    _version_field,
)

ROTATE_DESCRIPTION = (
    "Suggestion rotation: while a word is being typed, words already offered for it and passed over are left out "
    "of the next keystrokes' suggestions, so each keystroke shows new candidates (a word passed over does not come "
    "back until the word is finished or deleted). Default NEXTWORD_SUGGESTION_ROTATION. With rotation on, "
    "suggestions depend on the keystrokes and not only on the text."
)


class SessionCreateRequest(_Strict):
    model: str | None = _model_field()
    version: OptInt = _version_field()
    text: str = Field("", description="Initial text (same keyboard semantics as /v1/predict).",
                      examples=["The quick brown "])
    k: Int = Field(5, ge=1, le=MAX_K, description="Default number of predictions for this session's updates.")
    ttl_seconds: OptInt = Field(
        None, ge=1, description="Idle time after which the session expires, at most "
        "NEXTWORD_SESSION_MAX_TTL_SECONDS (default NEXTWORD_SESSION_TTL_SECONDS). Every update restarts it."
    )
    learn: bool = Field(True, description=LEARN_DESCRIPTION + " For the session's whole life.")
    rotate: bool | None = Field(None, description=ROTATE_DESCRIPTION)
    filter: bool = Field(True, description=FILTER_DESCRIPTION + " The session's default for its updates.")
    corrections: bool = Field(True, description=CORRECTIONS_DESCRIPTION + " The session's default for its updates.")


class SessionUpdateRequest(_Strict):
    text: str | None = Field(
        None, description="Text to append (a keystroke, a word, a paste). At most NEXTWORD_MAX_DELTA_CHARS.",
        examples=["fox "],
    )
    replace_pending: str | None = Field(
        None, description="Backspace/correction: replaces the uncommitted fragment (the session's `pending`, the "
        "text typed since the last whitespace) before `text` is appended; '' deletes it. Committed words "
        "(followed by whitespace) are final and cannot be edited: recreate the session for that.",
    )
    k: OptInt = Field(None, ge=1, le=MAX_K, description="Predictions to return (default: the session's k).")
    learn: bool = Field(True, description="false: this update's text is neither adapted to nor learned from "
                        "(incognito); the session's earlier words still count.")
    filter: bool | None = Field(None, description="This update only: " + FILTER_DESCRIPTION + " Default: the "
                                "session's.")
    corrections: bool | None = Field(None, description="This update only: " + CORRECTIONS_DESCRIPTION
                                     + " Default: the session's.")


class SessionInfo(BaseModel):
    model_config = {"protected_namespaces": ()}

    session_id: str
    model: str
    version: int = Field(description="The model version holding the session's state.")
    committed_words: int = Field(description="Words committed to the recurrent state so far.")
    context_words: int = Field(description="Committed words the state has read (fewer than committed_words "
                               "after a rebuild on another version, or a text or paste longer than "
                               "NEXTWORD_CONTEXT_WORDS, of which only the last words are read).")
    pending: str = Field(description="Uncommitted text since the last whitespace (the word being typed).")
    k: int
    learn: bool = Field(description="Whether the session adapts to its text (see SessionCreateRequest.learn).")
    rotate: bool = Field(description="Whether suggestion rotation is on (see SessionCreateRequest.rotate).")
    filter: bool = Field(description="The session's default for leaving out blocklisted words.")
    corrections: bool = Field(description="The session's default for offering corrections.")
    ttl_seconds: float
    created: float = Field(description="Unix time.")
    last_used: float = Field(description="Unix time of the last update.")
    expires_at: float = Field(description="Unix time the session expires unless updated.")


class SessionPredictions(BaseModel):
    model_config = {"protected_namespaces": ()}

    session_id: str
    model: str
    version: int
    predictions: list[WordProbability] = Field(description="Most likely first; <unk>/<eos> never appear.")
    prefix: str = Field(description="The word fragment completed (lowercased), or '' for a whole next word.")
    prefix_probability: float
    matches: int
    context_words: int = Field(description="Words the model read: the session's committed context + the words of "
                               "the pending fragment.")
    committed_words: int
    pending: str
    rebuilt: bool = Field(description="True when the session's version was unloaded and its state was rebuilt on "
                          "`version` (the model's serving version) from its last committed words.")
    expires_at: float


class StreamMessage(_Strict):
    """One client message on ``/v1/sessions/.../stream``."""

    seq: Int = Field(description="Client sequence number, echoed in the answer.")
    text: str | None = None
    replace_pending: str | None = None
    k: OptInt = Field(None, ge=1, le=MAX_K)
    learn: bool = True
    filter: bool | None = None
    corrections: bool | None = None


class StreamOpenQuery(_Strict):
    """Query parameters of ``/v1/sessions/stream`` (the session it opens)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=False)  # query values are strings

    model: str | None = None
    version: int | None = Field(None, ge=1)
    text: str = ""
    k: int = Field(5, ge=1, le=MAX_K)
    ttl_seconds: int | None = Field(None, ge=1)
    learn: bool = True
    rotate: bool | None = None
    filter: bool = True
    corrections: bool = True
