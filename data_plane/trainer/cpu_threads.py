"""How many CPU threads one op of a CPU trainer computes with: a small op gets one.

On a CPU, torch runs every op on all cores (OpenMP). For an op of a few tokens the split buys
nothing (starting and synchronising the threads costs what it saves), and it costs the rest of
the machine: after each parallel region the pool's threads spin on the cores that the API
server and the client need to carry the answer back. On a 2-core machine a 1 × 8-token
``forward`` round trip through the tinker SDK took ~24–26 ms with the default and ~18 ms with the
trainer on one thread (bench/README.md, "Where the time of an op goes"). Ops of more tokens than
the threshold keep the process's threads: a 32 × 256 step on one thread of two took 1.5×
as long. On an accelerator, and in a process already on one thread (the ranks under torchrun),
nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def threads_for(device: torch.device, tokens: int, small_op_tokens: int) -> Iterator[None]:
    """Run the body on one intra-op thread when ``tokens`` is at most ``small_op_tokens`` on a CPU
    device (``small_op_tokens`` 0: never); otherwise as the process is."""
    before = torch.get_num_threads()
    if device.type != "cpu" or tokens > small_op_tokens or before <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
