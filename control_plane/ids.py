"""Identifier formats. Tinker ids follow the SDK's binding formats (wire protocol section 11)."""

from __future__ import annotations

import secrets
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def new_session_id() -> str:
    return str(uuid.uuid4())


def training_model_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"
