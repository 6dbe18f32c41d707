"""Scale to zero and wake-up: request activity, idleness, and the request path's wait."""
