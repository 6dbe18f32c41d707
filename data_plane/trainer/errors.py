"""Errors the worker maps to failed futures."""

from __future__ import annotations


class UserError(ValueError):
    """Bad client input (future category ``user``). Raised before any state changes."""


class ServerError(RuntimeError):
    """Something went wrong on our side (future category ``server``)."""
