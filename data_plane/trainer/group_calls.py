"""Model calls run by every rank of a trainer, in the same order (the leader decides).

The leader (global rank 0) runs the worker loop; each call it makes on its
:class:`~data_plane.trainer.training.TrainingModel` that changes the training state or runs the
model is a *group call*: the leader first sends the call's name and arguments to every other
rank, and they make the same call on their own model (:func:`follow`). Sharded forward and
backward passes need every rank of a replica at once, and every rank must hold the same adapter,
optimizer and gradients afterwards.

After a call, every rank reports its outcome (success, or the error's type and message) and all
compare them. They are deterministic, so they agree; if they do not (a store read failed on
one rank only, a rank ran out of memory), the ranks no longer hold the same state, and the
whole group exits (:data:`DIVERGED_EXIT`): the controller restarts it and the run resumes from
its last snapshot and op log, as after any crash (docs/durability.md). A rank that finds another
one gone (a collective between them fails) exits the same way (:data:`BROKEN_EXIT`), without
answering the op in hand: the restarted group executes it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import torch.distributed as dist

if TYPE_CHECKING:
    from data_plane.trainer.ranks import Ranks
    from data_plane.trainer.training import TrainingModel

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

EXIT = "__exit__"
DIVERGED_EXIT = 70  # the process exit status when the ranks' outcomes differ
BROKEN_EXIT = 71  # ... when another rank is gone (a collective between them failed)


def _exit(status: int, why: str, *args: object) -> NoReturn:
    log.critical(why, *args)
    logging.shutdown()
    os._exit(status)


class Group:
    """This rank's side of the group calls."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._depth = 0  # group calls in progress on this rank (a call may make others)

    @property
    def is_leader(self) -> bool:
        return self.ranks.is_leader

    def send(self, name: str, args: tuple, kwargs: dict) -> None:
        try:
            dist.broadcast_object_list([(name, args, kwargs)], src=0, group=self.ranks.control)
        except Exception as exc:  # noqa: BLE001 - any failure here means a rank is gone
            self._broken(exc)

    def receive(self) -> tuple[str, tuple, dict]:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.ranks.control)
        except Exception as exc:  # noqa: BLE001
            self._broken(exc)
        return box[0]

    def _broken(self, exc: BaseException) -> NoReturn:
        """Another rank is gone: this one cannot go on (and must not answer the op in hand as
        failed: the run resumes on a new group, which executes it)."""
        _exit(
            BROKEN_EXIT,
            "rank %d lost the trainer's other ranks (%s: %s); exiting so that the group restarts",
            self.ranks.rank,
            type(exc).__name__,
            exc,
        )

    def agree(self, outcome: str | None) -> None:
        """Compare this rank's outcome of the call with everyone's; exit the process when they
        differ (the state is no longer the same on every rank)."""
        outcomes: list[Any] = [None] * self.ranks.world
        try:
            dist.all_gather_object(outcomes, outcome, group=self.ranks.control)
        except Exception as exc:  # noqa: BLE001 - a rank died during the call (its error is this one's cause)
            self._broken(exc)
        if len(set(outcomes)) > 1:
            _exit(
                DIVERGED_EXIT,
                "the trainer's ranks disagree on the outcome of a call (%s); exiting so that the group restarts "
                "and the run resumes from its snapshot",
                "; ".join(f"rank {i}: {o or 'ok'}" for i, o in enumerate(outcomes)),
            )

    def stop_followers(self) -> None:
        if self.is_leader and self.ranks.world > 1:
            self.send(EXIT, (), {})


def group_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Make a :class:`TrainingModel` method a group call (a no-op wrapper without a group)."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0]
        group: Group | None = getattr(model, "group", None)
        if group is None or group._depth:
            return fn(*args, **kwargs)
        if group.is_leader:
            group.send(fn.__name__, args[1:], kwargs)
        group._depth += 1
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            group._depth -= 1
            group.agree(f"{type(exc).__name__}: {exc}")
            raise
        group._depth -= 1
        group.agree(None)
        return out

    return call


def follow(model: TrainingModel, group: Group) -> int:
    """A follower's whole life: make the leader's calls until it says to stop."""
    log.info("following rank 0 (%s)", group.ranks.describe())
    while True:
        name, args, kwargs = group.receive()
        if name == EXIT:
            log.info("rank 0 stopped; rank %d exits", group.ranks.rank)
            return 0
        try:
            getattr(model, name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the leader answers the client; the outcomes were compared
            log.debug("%s failed on rank %d as on every rank: %s", name, group.ranks.rank, exc)
