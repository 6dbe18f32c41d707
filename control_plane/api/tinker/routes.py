"""Every ``/api/v1`` route handler of the Tinker API, registered by the app factory."""

from __future__ import annotations

from control_plane.api.tinker.bootstrap import TinkerBootstrapController
from control_plane.api.tinker.futures import TinkerFuturesController
from control_plane.api.tinker.rest import TinkerRestController
from control_plane.api.tinker.sampling import SAMPLING_HANDLERS
from control_plane.api.tinker.training import TinkerTrainingController

TINKER_HANDLERS: list[type] = [
    TinkerBootstrapController,
    TinkerTrainingController,
    TinkerFuturesController,
    TinkerRestController,
    *SAMPLING_HANDLERS,
]
