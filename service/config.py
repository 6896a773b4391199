"""Service configuration: one settings class, every field an ``NEXTWORD_<FIELD>`` environment variable.

Example: ``NEXTWORD_MODEL_REPOSITORY=/srv/models NEXTWORD_DEVICE=cuda nextword-serve``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Chosen by measured keystroke savings (README, "Sessions that learn the writer").
SUGGESTION_ROTATION_DEFAULT = False


class Settings(BaseSettings):
    """All knobs of the service. Defaults suit a laptop; containers override them by env."""

    model_config = SettingsConfigDict(env_prefix="NEXTWORD_", extra="ignore", protected_namespaces=())

    # --- model repository -------------------------------------------------------------------
    model_repository: Path = Field(Path("models"), description="Root of models/<name>/<version>/.")
    default_model: str | None = Field(
        None, description="Model answering requests that name none (default: the first name alphabetically)."
    )
    reload_interval_seconds: float = Field(
        5.0, ge=0, description="How often the repository is polled for new/removed versions (0 = never; "
        "POST /v1/models/reload still works)."
    )

    # --- runtime ------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda needs onnxruntime-gpu and a GPU (else start-up fails); auto falls back to CPU."
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0 = its default).")
    intra_op_spinning: bool = Field(
        False, description="Let onnxruntime's idle worker threads spin between batches: lower latency on a dedicated "
        "machine, but the spinning takes CPU from the HTTP event loop on a small one."
    )
    long_prompt_spinning: bool = Field(
        True, description="With INTRA_OP_SPINNING off: run a batch of 128 or more time steps (under 4,096 tokens "
        "in all) that has the model to itself on a second predict session whose threads spin (a 512-word "
        "prompt: ~23 instead of ~62 ms on 2 cores). Costs ~70 MB per loaded model version."
    )

    # --- dynamic batching ---------------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="Most rows coalesced into one onnxruntime call.")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="Longest the oldest queued item waits for companions before its batch runs. 0 (the "
        "default) never waits: under load batches still form from the items that queue while a batch computes, and "
        "a lone request pays nothing (measured: 1-client p50 6.5 vs 9.1 ms, same 64-client throughput as 2 ms)."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Cap on rows x padded length of one batch, so one long text does not make "
        "many short ones pay for its padding."
    )
    inference_workers: int = Field(
        2, ge=1, description="Worker threads per model version, each running one batch at a time from the shared "
        "queue. A batch that runs alone uses all NEXTWORD_INTRA_OP_THREADS; batches that overlap, and every batch "
        "while session steps wait for companions (keyboard load), use sessions with the threads divided among the "
        "workers, so under load the model keeps a core busy while the HTTP event loop uses the other (measured on 2 "
        "cores: 64-client throughput +13%, single-client latency unchanged). "
        "With more than 1, each loaded version holds a second predict session (~75 MB for the default model)."
    )
    queue_capacity: int = Field(1024, ge=1, description="Work items waiting per model version; beyond it: 503.")
    request_timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline of a work item from submission; waiting past it gives 504."
    )

    # --- input limits -------------------------------------------------------------------------
    max_text_chars: int = Field(100_000, ge=1, description="Longest accepted text (characters); longer: 413.")
    max_batch_items: int = Field(64, ge=1, description="Most items in one POST /v1/predict/batch.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body; larger: 413.")
    context_words: int = Field(
        512, ge=1, description="Context budget: stateless predict reads only the last N words of the text "
        "(the response then says truncated=true). Bounds the cost of one item, so that a full batch request "
        "(NEXTWORD_MAX_BATCH_ITEMS items at this budget) is served well within the deadline (measured on 2 busy "
        "cores: 64 items of 4,000 words 4.8 s at 512, 10.6 s at 1024). The default model was trained on 35-word "
        "windows; 512 words is far beyond what its state carries."
    )
    max_score_words: int = Field(
        4096, ge=1, description="Most words one /v1/score (or OpenAI echo with logprobs) reads; more: 413. Scoring "
        "reads the whole text, so this bounds its time (measured on 2 busy cores, one intra-op thread: 4,096 words "
        "2.9 s, 8,192 words 4.8 s, within a 10 s deadline only without other load)."
    )
    score_chunk_tokens: int = Field(
        256, ge=1, description="Scoring runs through the score graph in chunks of at most this many tokens, carrying "
        "the recurrent state, and a score batch holds at most this many padded tokens: the graph's "
        "tokens x vocabulary intermediates stay ~18 MB each for the default model whatever the text length."
    )
    max_generation_words: int = Field(
        256, ge=1, description="Most words one completion may generate (max_words / OpenAI max_tokens); "
        "bounds how long one generation keeps stepping through the batcher."
    )

    # --- adaptation to the writer (service/engine/cache_lm.py) -----------------------------------
    adaptation: bool = Field(
        True, description="Mix each text's own recent words into its predictions with the model's fitted cache "
        "(model.json \"cache\"; a model without one is served unmixed) and offer its new words. Requests and "
        "sessions can still turn it off with learn=false."
    )
    cache_window_words: int = Field(
        2000, ge=0, le=100_000, description="Most recent words of a text the cache reads, and so the most a session "
        "stores for it (the model's fitted window if smaller; 0 turns the cache off). ~7 bytes a word in a "
        "session record."
    )
    new_word_min_count: int = Field(
        2, ge=0, description="Times a word outside the vocabulary must appear among those recent words before it "
        "is offered as a suggestion (0 = never offer new words)."
    )
    new_word_first_use: bool = Field(
        True, description="Offer a new word after its first use when it is letters only and no single typing "
        "error (a letter left out, added, changed, or two swapped) turns a vocabulary word into it: it is then "
        "no slip on a known word. Words that could be slips still wait for NEW_WORD_MIN_COUNT uses."
    )
    suggestion_rotation: bool = Field(
        SUGGESTION_ROTATION_DEFAULT, description="Default of a session's `rotate` option: words offered for the "
        "word being typed and passed over are left out of its next keystrokes' suggestions."
    )

    # --- suggestions ---------------------------------------------------------------------------
    blocklist: str = Field(
        "default", description="Words never suggested, completed or generated (a request may still ask with "
        "filter=false): 'default' (the list shipped in service/engine/blocklist.txt), 'off', or the path of a "
        "file with one word a line ('#' comments)."
    )
    corrections: bool = Field(
        True, description="Offer corrections of a mistyped fragment beside its completions (a request may still "
        "turn them off with corrections=false). Off: no correction index is built (about 5 MB per version)."
    )

    # --- HTTP / logging -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_delay_seconds: float = Field(
        0.0, ge=0, le=300, description="After SIGTERM, how long nextword-serve keeps serving with /readyz answering "
        "503, so that load balancers stop sending it work before it closes its WebSockets (1012) and stops "
        "accepting connections (service/api/shutdown.py). 0 stops at once, still draining what is in flight."
    )

    # --- access control and connections (service/api/access.py) --------------------------------
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys: when any is set (here or in NEXTWORD_API_KEYS_FILE), every "
        "route but /healthz, /readyz, /metrics and the page's static files needs Authorization: Bearer <key>."
    )
    api_keys_file: Path | None = Field(None, description="File of API keys, one per line (# comments).")
    admin_api_keys: SecretStr | None = Field(
        None, description="Comma-separated keys that may POST /v1/models/reload while API keys are on (they are "
        "API keys too); none set: nobody may (the poller still loads new versions)."
    )
    metrics_require_key: bool = Field(False, description="Also require an API key for /metrics.")
    rate_limit_per_second: float = Field(
        0.0, ge=0, description="Requests per second per API key (per client address without keys), as a token "
        "bucket; 0 = no limit. Over it: 429 with Retry-After. Shared by replicas through a Redis session store."
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Token bucket size (requests that may come at once); 0 = twice the rate, at least 1."
    )
    cors_allowed_origins: str = Field(
        "", description="Comma-separated origins allowed cross-site (CORS) and to open WebSockets; none by "
        "default (the service's own origin always may)."
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="nextword-serve: a connection that has not sent a request's complete headers "
        "within this time (from connecting, or from the request's first byte) is closed."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest a request body may take to arrive; slower: 408 and the connection closes."
    )
    max_connections: int = Field(
        4096, ge=1, description="nextword-serve: most concurrent connections and WebSockets; more are answered 503."
    )

    # --- sessions (used by the stateful-session feature) ---------------------------------------
    session_store: str = Field(
        "memory", description="memory, a redis://... URL (one Redis or primary), or redis+cluster://host:port "
        "(Redis Cluster: any one node, the others are discovered)."
    )
    session_ttl_seconds: float = Field(1800.0, gt=0, description="Idle time after which a session expires.")
    max_sessions: int = Field(
        100_000, ge=1, description="Most live sessions per store: the memory store evicts the least recently "
        "used, the Redis store the one closest to expiry."
    )
    session_max_ttl_seconds: float = Field(
        86_400.0, gt=0, description="Largest ttl_seconds a client may ask for when creating a session."
    )
    session_rebuild_words: int = Field(
        256, ge=1, description="Committed words a session keeps to rebuild its state on another model version "
        "when its own version is unloaded."
    )
    max_delta_chars: int = Field(
        10_000, ge=1, description="Longest text delta (or replace_pending) of one session update; longer: 413."
    )
    session_lock_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest an update waits for another update of the same session; then 409."
    )
    session_lock_lease_seconds: float = Field(
        1.5, gt=0, description="Lease of a session's Redis update lock. The holder renews it three times per lease "
        "while its update runs, so this is how long a replica that died mid-update keeps the session locked (409 "
        "session_busy meanwhile), not a limit on how long an update may take."
    )
    session_secret: SecretStr | None = Field(
        None, description="Key of the HMAC that turns client-chosen ids (KServe sequence_id) into server-held "
        "session ids, so nobody can compute another client's session id. Unset: a random key, created once in the "
        "session store (Redis: shared by every replica using it; memory: per process)."
    )
    session_sweep_interval_seconds: float = Field(
        5.0, ge=0, description="How often expired sessions are reaped and the active-session gauge refreshed "
        "(0 = never; expiry is still enforced on access)."
    )
    session_row_cache_bytes: int = Field(
        128 << 20, ge=0, description="Bytes of this process's keystroke cache: each session's last next-word "
        "distribution, so that an update that commits no word (typing inside a word, backspace) costs no model "
        "work. A cached session costs 4 x vocabulary size + its state + 4 bytes per learned word + 1 KB (79,332 to "
        "87,340 bytes for brown-lstm); least recently used out first. 0 turns the fast path off (every update runs "
        "the model)."
    )
    session_queue_delay_ms: float = Field(
        8.0, ge=0, le=1000, description="Under keyboard load, the longest a word-completing session update's model "
        "step waits for other sessions' to share one onnxruntime call. It waits only while such updates arrive "
        "more often than this and overlap one another (running averages), so neither a lone typist nor one client "
        "taking turns between its sessions ever waits; 0: "
        "session steps wait like any request (NEXTWORD_MAX_QUEUE_DELAY_MS)."
    )
    session_store_timeout_seconds: float = Field(
        2.0, gt=0, description="Connect/read timeout of Redis calls; past it the session call answers 503."
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug, trace")
        return value

    @field_validator("session_store")
    @classmethod
    def _store(cls, value: str) -> str:
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if value != "memory" and not value.startswith(schemes):
            raise ValueError("session_store must be 'memory', a redis:// URL or a redis+cluster:// URL")
        return value

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_allowed_origins.split(",") if o.strip()]

    @property
    def rate_burst(self) -> int:
        return self.rate_limit_burst or max(1, math.ceil(2 * self.rate_limit_per_second))

    @property
    def max_queue_delay_seconds(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def request_deadline_seconds(self) -> float:
        """The longest a legitimate request takes: its queue deadline plus two session store
        round trips, and a second. Bounds the shutdown's wait for requests and WebSockets in
        flight."""
        return self.request_timeout_seconds + 2 * self.session_store_timeout_seconds + 1.0
