"""The Loops client venv holds the official SDK, its Tinker shim and tinker-cookbook, and the SDK,
configured only by its environment variables, reaches the live server."""

from __future__ import annotations

import pytest

IMPORTS = """
import json
import baseten.loops
import tinker
import tinker_cookbook.supervised.train
print(json.dumps({
    "loops_version": baseten.loops.__version__,
    "tinker_title": tinker.__title__,
    "tinker_client_is_loops": tinker.SamplingClient is baseten.loops.SamplingClient,
    "cookbook_train": tinker_cookbook.supervised.train.__name__,
}))
"""

SESSION = """
import json
import baseten.loops
client = baseten.loops.ServiceClient()
caps = client.get_server_capabilities()
print(json.dumps({
    "session_id": client._session_id,
    "models": [m.model_name for m in caps.supported_models],
}))
"""


def test_venv_holds_the_sdk_shim_and_cookbook(loops_client) -> None:
    out = loops_client.run(IMPORTS, timeout=300).result
    assert out == {
        "loops_version": "0.32.0",
        "tinker_title": "baseten-loops-tinker",
        "tinker_client_is_loops": True,
        "cookbook_train": "tinker_cookbook.supervised.train",
    }


def test_service_client_opens_a_session_and_lists_the_model(loops_client, live_server) -> None:
    out = loops_client.run(SESSION, timeout=120).result
    assert out is not None
    assert isinstance(out["session_id"], str) and out["session_id"]
    assert live_server.model.name in out["models"]


def test_a_failing_client_script_explains_itself(loops_client) -> None:
    with pytest.raises(AssertionError, match="exited with 3(.|\\n)*client-side trouble"):
        loops_client.run("import sys\nsys.stderr.write('client-side trouble\\n')\nsys.exit(3)\n")
