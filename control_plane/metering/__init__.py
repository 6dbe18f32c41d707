"""Metering: request counters of serving routes, resource samples of workloads, and the
metric series built from them."""
