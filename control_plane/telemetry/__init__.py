"""Server-side training telemetry: per-step metrics from the trainers' telemetry stream
(consumer, merge rule, storage, reads, retention)."""
