"""Prometheus metrics, exactly as listed in ``docs/metrics.md`` (a Grafana dashboard is built on them).

Every metric lives in the default registry at module level, so any part of the service (engine,
routes, the session and generation features) increments the same objects, and several apps in
one test process share them instead of registering duplicates.

Labels stay bounded: route *templates* (never raw paths), model names and versions from the
repository, and small fixed enums. Never user text, session ids or file paths.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_GENERATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- HTTP ---------------------------------------------------------------------------------------
REQUESTS = Counter("nextword_requests_total", "HTTP requests answered.", ["route", "method", "status"])
REQUEST_DURATION = Histogram(
    "nextword_request_duration_seconds", "Wall time from request arrival to response.", ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)

# --- engine -------------------------------------------------------------------------------------
QUEUE_WAIT = Histogram(
    "nextword_queue_wait_seconds", "Time a work item waited in the batcher before its batch started.", ["model"],
    buckets=_WAIT_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "nextword_inference_duration_seconds", "onnxruntime run time of one batch.", ["model", "version", "graph"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("nextword_batch_size", "Rows per onnxruntime call.", ["model"], buckets=_BATCH_BUCKETS)
TOKENS = Counter("nextword_tokens_total", "Tokens (words) fed through the model.", ["model", "graph"])
QUEUE_DEPTH = Gauge("nextword_queue_depth", "Work items waiting in the batcher.", ["model"])
MODEL_LOADS = Counter(
    "nextword_model_loads_total", "Model version load attempts (load + checksum + self-check).", ["model", "result"]
)
MODEL_VERSION_INFO = Gauge(
    "nextword_model_version_info", "One series per known model version (value 1).",
    ["model", "version", "cell", "device", "status"],
)

# --- sessions (incremented by the stateful-session feature) ------------------------------------
SESSIONS_ACTIVE = Gauge("nextword_sessions_active", "Live sessions in the store.", ["store"])
SESSIONS_CREATED = Counter("nextword_sessions_created_total", "Sessions created.", ["store"])
SESSIONS_EXPIRED = Counter("nextword_sessions_expired_total", "Sessions found or reaped past their TTL.", ["store"])
SESSIONS_EVICTED = Counter("nextword_sessions_evicted_total", "Sessions evicted by the LRU bound.", ["store"])
SESSIONS_DELETED = Counter("nextword_sessions_deleted_total", "Sessions deleted by clients.", ["store"])
SESSION_UPDATE_DURATION = Histogram(
    "nextword_session_update_duration_seconds", "Latency of a session text update.", ["transport"],
    buckets=_LATENCY_BUCKETS,
)
SESSION_STORE_ERRORS = Counter(
    "nextword_session_store_errors_total", "Session store failures.", ["store", "operation"]
)
ROW_CACHE_LOOKUPS = Counter(
    "nextword_session_row_cache_lookups_total",
    "Session updates that commit no word, by whether the cached distribution could answer them.", ["result"],
)
ROW_CACHE_BYTES = Gauge("nextword_session_row_cache_bytes", "Bytes held by the session distribution cache.")
ROW_CACHE_ENTRIES = Gauge("nextword_session_row_cache_entries", "Sessions in the session distribution cache.")
ROW_CACHE_EVICTIONS = Counter(
    "nextword_session_row_cache_evictions_total", "Cached session distributions dropped by the byte bound."
)
for _result in ("hit", "miss"):  # both series exist from the start, so rates read 0 rather than no data
    ROW_CACHE_LOOKUPS.labels(_result)

# --- generation (incremented by the generation feature) ----------------------------------------
GENERATED_WORDS = Counter("nextword_generated_words_total", "Words produced by generation endpoints.", ["model"])
GENERATION_DURATION = Histogram(
    "nextword_generation_duration_seconds", "Time for a whole generation.", ["model"], buckets=_GENERATION_BUCKETS
)
GENERATION_TTFW = Histogram(
    "nextword_generation_time_to_first_word_seconds", "Time until the first generated word.", ["model"],
    buckets=_GENERATION_BUCKETS,
)


def render_latest() -> tuple[bytes, str]:
    """The exposition text of the default registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
