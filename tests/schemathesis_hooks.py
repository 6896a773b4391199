"""Schemathesis hooks for tests/test_schemathesis.py (loaded through ``SCHEMATHESIS_HOOKS``).

The OpenAPI document states every rule a JSON schema can state; a few of the server's documented
rules relate two fields and cannot be stated there. A schema-valid request refused *for one of
those rules* is not a failure: the refusal must be a 4xx whose error names the rule below, so a
refusal for any other reason still fails the run.
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis

# (operation label pattern, error message pattern): rules the schema cannot state.
CROSS_FIELD_RULES: list[tuple[str, str]] = [
    # OpenAI's own rules: best_of ≥ n, and best_of > n cannot stream.
    (r"POST /openai/v1/completions", r"best_of must be greater than or equal to n|best_of cannot be used with stream"),
    # Beam search returns at most beam_width completions.
    (r"POST /v1/generate", r"n \(\d+\) cannot exceed beam_width"),
    # A tensor's shape counts its data; a sequence's flags need its id; a sequence step is one text,
    # and continues a started sequence.
    (r"POST /v2/models/.*/infer",
     r"shape \[[\d, ]*\] but \d+ elements|sequence_start and sequence_end need a sequence_id"
     r"|a sequence request carries exactly one text|is not active for model"),
]


def _message(body: bytes) -> str:
    try:
        error: Any = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return ""
    return error if isinstance(error, str) else str(error.get("message", "")) if isinstance(error, dict) else ""


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure except a refused schema-valid request that broke a rule above."""
    if getattr(failure, "code", None) != "ST202" or not 400 <= response.status_code < 500:
        return True
    label, message = case.operation.label, _message(response.content)
    return not any(re.fullmatch(op, label) and re.search(rule, message) for op, rule in CROSS_FIELD_RULES)
