"""Every route declares what it answers (control_plane/api/openapi.py says how): a success body
with a schema, and for every error status the one error body. An authenticated route declares
401, 403 and 429; a route with inputs 400; a route with a body 413. Checked on the schema the
app serves, without a database (the schemathesis test checks the schema against a server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from control_plane.api.app import create_app
from control_plane.runtime import build_runtime
from control_plane.settings import Settings

ERROR = "#/components/schemas/ErrorBody"
# answers that are not errors of the table: the protocol's own bodies
PROTOCOL_ANSWERS = {
    ("get", "/readyz", "503"): "#/components/schemas/Readiness",
    ("get", "/v1/loops/deployments/{deployment_id}/trainer/health", "503"): "#/components/schemas/TrainerHealth",
    (
        "get",
        "/v1/loops/deployments/{deployment_id}/trainer/operations/{operation_id}",
        "408",
    ): "#/components/schemas/OperationPending",
}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/v1/downloads/{token}"}
NOT_JSON = {("get", "/metrics"), ("get", "/v1/downloads/{token}")}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("openapi")
    (d / "catalog.yaml").write_text("models: []\n")
    settings = Settings(
        database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",  # never connected to
        redis_url="redis://127.0.0.1:1/0",
        data_dir=d,
        model_catalog_path=d / "catalog.yaml",
        access_log=False,
    )
    with TestClient(create_app(build_runtime(settings, with_backend=False))) as client:
        r = client.get("/docs/openapi.json")
        assert r.status_code == 200
        doc: dict[str, Any] = r.json()
        return doc


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield method, path, op


def test_every_route_declares_its_answers(schema: dict[str, Any]) -> None:
    problems: list[str] = []
    ops = list(operations(schema))
    assert len(ops) >= 80
    for method, path, op in ops:
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        ok = [s for s in responses if s.startswith("2")]
        if len(ok) != 1:
            problems.append(f"{where}: success statuses {ok}")
        for status in ok:
            content = responses[status].get("content") or {}
            if not content or any(not m.get("schema") for m in content.values()):
                problems.append(f"{where}: {status} has no body schema")
            elif (method, path) not in NOT_JSON and "application/json" not in content:
                problems.append(f"{where}: {status} is not JSON")
        for status, answer in responses.items():
            if status[0] not in "45":
                continue
            want = PROTOCOL_ANSWERS.get((method, path, status), ERROR)
            schemas = [m.get("schema", {}).get("$ref") for m in (answer.get("content") or {}).values()]
            if schemas != [want]:
                problems.append(f"{where}: {status} answers {schemas}, not {want}")
        needed = set()
        if path not in PUBLIC:
            needed |= {"401", "403", "429"}
        if op.get("parameters") or op.get("requestBody"):
            needed.add("400")
        if op.get("requestBody"):
            needed.add("413")
        if missing := needed - set(responses):
            problems.append(f"{where}: does not declare {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_the_error_body_is_the_one_the_handlers_send(schema: dict[str, Any]) -> None:
    body = schema["components"]["schemas"]["ErrorBody"]
    assert set(body["required"]) == {"code", "detail", "request_id"}
    assert {"field", "errors", "category", "retry_after_s"} <= set(body["properties"])


def test_limits_are_in_the_schema(schema: dict[str, Any]) -> None:
    """The limits the edge enforces are the ones the schema states (a sample)."""
    comps = schema["components"]["schemas"]

    def prop(model: str, name: str) -> dict[str, Any]:
        p = comps[model]["properties"][name]  # an optional field: its limits beside oneOf [type, null]
        return {**next((x for x in p.get("oneOf", []) if x.get("type") != "null"), {}), **p}

    session = next(k for k in comps if k.endswith("CreateSessionBody") and "tags" in comps[k]["properties"])
    assert prop(session, "display_name")["maxLength"] == 200
    assert prop(session, "sdk_version")["maxLength"] == 40
    assert prop(session, "display_name")["pattern"] == r"^[^\x00]*$"
    assert prop(session, "tags")["items"]["pattern"] == r"^[^\x00]*$"
    model = comps["CreateModelBody"]["properties"]["model_seq_id"]
    assert (model["minimum"], model["maximum"]) == (0, 2**31 - 1)
    assert isinstance(model["maximum"], int)  # exact, not a float
    params = {p["name"]: p for p in schema["paths"]["/api/v1/sessions"]["get"]["parameters"]}
    assert params["offset"]["schema"]["maximum"] == 2**63 - 1024
    assert params["limit"]["schema"]["maximum"] == 1000
    run_id = next(p for p in schema["paths"]["/v1/loops/runs/{run_id}"]["get"]["parameters"] if p["name"] == "run_id")
    assert run_id["schema"]["maxLength"] == 128
