"""The trainer process (``python -m data_plane.trainer``, alone or as one rank under torchrun).

Settings come from ``OPENLOOPS_WORKER_CONFIG`` (:class:`~data_plane.wire.worker_config.TrainerLaunch`).
Alone, or as rank 0 of several, the process runs the :class:`~data_plane.trainer.worker.Worker`
loop; any other rank loads its part of the base model and follows rank 0's model calls
(:mod:`data_plane.trainer.group_calls`) until rank 0 stops.

SIGTERM/SIGINT: rank 0 finishes the op in hand, writes a final snapshot and stops its
followers; a follower ignores the signal (torchrun sends it to every rank at once, and rank 0
may still need it to finish the op).
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

from data_plane.wire.worker_config import TrainerLaunch

log = logging.getLogger("openloops.trainer")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def main() -> int:
    logging.basicConfig(
        # the same variable the control plane reads (any case: "info", "WARNING", ...)
        level=os.environ.get("OPENLOOPS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _quiet_libraries()
    launch = TrainerLaunch.from_env()

    from data_plane.trainer import ranks as rank_setup
    from data_plane.trainer.group_calls import Group
    from data_plane.trainer.worker import Worker

    group = None
    if rank_setup.world_from_env() > 1:
        from data_plane.trainer.model import pick_device

        group = Group(rank_setup.init(launch.replicas, pick_device(launch.device).type))
    try:
        if group is not None and not group.is_leader:
            return _follow(launch, group)
        worker = Worker(launch, group=group)

        def _stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the current op", signum)
            worker.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        return worker.run_forever()
    finally:
        if group is not None:
            rank_setup.close()


def _follow(launch: TrainerLaunch, group: object) -> int:
    from data_plane.storage.factory import open_store
    from data_plane.trainer.group_calls import Group, follow
    from data_plane.trainer.training import TrainingModel

    assert isinstance(group, Group)

    def _ignore(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: rank %d keeps following rank 0 until it stops", signum, group.ranks.rank)

    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    return follow(TrainingModel.from_launch(launch, open_store(launch.store), group), group)
