"""The web console in a real browser (Debian's Chromium driven by Playwright) against a live
server: sign in, the runs list shows a run the tinker SDK trains in this test, its page charts
the run's real losses (the values plotted are the API's) and updates as steps arrive, its
checkpoints have download links, another org's run is a 404 page, an org admin creates and
revokes keys, and a revoked key is signed out. A screenshot of each page is kept
(tests/infra/browser.py). The served-model page and its playground are tested with a served
model in tests/e2e/test_served_models.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import tinker
from tinker import types

from control_plane.metering.requests import RUN_SAMPLING, Tokens
from control_plane.statuses import Scope
from tests.e2e.sft import TEXT, datum
from tests.infra.browser import sign_in
from tests.infra.live_runs import new_tenant
from tests.infra.live_server import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LR = 1e-2
WAIT_MS = 30_000


def metrics_of(server: LiveServer, run_id: str, steps: int) -> list[dict]:
    """The run's training metrics from the API, once it holds ``steps`` steps."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(
            f"{server.base_url}/v1/loops/runs/{run_id}/training_metrics",
            headers={"Authorization": f"Api-Key {server.api_key}"},
            params={"max_points": 500},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        got = r.json()["steps"]
        if len(got) >= steps:
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


def at(path: str) -> Callable[[str], bool]:
    """A URL predicate: the page is at ``path`` (percent-decoded; run ids hold colons)."""
    return lambda url: unquote(urlsplit(url).path) == path


def plotted(page: Any, chart: str) -> list[list[float]]:
    raw = page.get_attribute(f'.chart[data-chart="{chart}"] svg', "data-series")
    assert raw is not None
    return json.loads(raw)[0]["points"]


def test_the_console_shows_a_run_trained_by_the_tinker_sdk(live_server: LiveServer, browser: Any, shots: Any) -> None:
    server = live_server
    service = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    tc = service.create_lora_training_client(server.model.name, rank=4, seed=5).result()
    tok = tc.get_tokenizer()
    run_id = str(tc.model_id)

    def train(steps: int) -> None:
        for _ in range(steps):
            fb = tc.forward_backward([datum(tok, TEXT), datum(tok, TEXT * 2)], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=LR)).result()
            fb.result()

    train(3)
    api_steps = metrics_of(server, run_id, 3)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()

    # sign in: the console opens on the runs page, which lists the run
    sign_in(page, server.base_url, server.api_key)
    page.wait_for_url("**/console/runs")
    row = page.locator(f'#runs tr[data-run-id="{run_id}"]')
    row.wait_for(timeout=WAIT_MS)
    assert "ACTIVE" in row.inner_text() and server.model.name in row.inner_text()
    assert page.evaluate("sessionStorage.getItem('openloops.apiKey')") == server.api_key
    assert server.api_key not in page.url
    shots(page, "runs")

    # the run page charts exactly the API's losses
    row.locator("a").first.click()
    page.wait_for_url(at(f"/console/runs/{run_id}"))
    page.locator('.chart[data-chart="loss:sum"] svg path').first.wait_for(timeout=WAIT_MS)
    want = [[s["step"], s["metrics"]["loss:sum"]] for s in api_steps]
    assert plotted(page, "loss:sum") == want
    assert len(want) == 3 and want[0][1] > want[-1][1]  # the SFT loss falls
    assert page.locator("#history td").filter(has_text="ACTIVE").count() >= 1

    # it updates as more steps arrive (no reload)
    train(2)
    five = metrics_of(server, run_id, 5)
    page.wait_for_function(
        "n => JSON.parse(document.querySelector('.chart[data-chart=\"loss:sum\"] svg').dataset.series)[0].points.length >= n",
        arg=5,
        timeout=WAIT_MS,
    )
    assert plotted(page, "loss:sum") == [[s["step"], s["metrics"]["loss:sum"]] for s in five]

    # a checkpoint appears with its download links
    path = tc.save_state("console-ckpt").result().path
    assert path.endswith("/console-ckpt")
    ckpt = page.locator("#checkpoints tr").filter(has_text="console-ckpt")
    ckpt.wait_for(timeout=WAIT_MS)
    ckpt.locator("button").click()
    links = ckpt.locator("a[download]")
    links.first.wait_for(timeout=WAIT_MS)
    href = links.first.get_attribute("href")
    assert (
        href and httpx.get(href if href.startswith("http") else server.base_url + href, timeout=30).status_code == 200
    )

    # the run's sampling: its totals and charts (counted as the sampling dispatcher counts a
    # request; the SDKs' sampling reaching these counters is tested in tests/e2e and tests/loops)
    async def sampled() -> None:
        server.runtime.meter.record(RUN_SAMPLING, run_id, 200, 30.0, Tokens(samples=2, prompt=5, completion=9))
        await server.runtime.meter.flush()

    assert "No sampling" in page.locator("#sampling").inner_text()
    server.call(sampled())
    totals = page.locator("#sampling-totals")
    totals.wait_for(timeout=WAIT_MS)
    assert totals.inner_text() == "1 requests (0 failed), 2 samples, 5 prompt tokens, 9 generated tokens"
    assert [p[1] for p in plotted(page, "sampling_tokens")] == [9]
    assert [p[1] for p in plotted(page, "sampling_inference_volume")] == [1]
    shots(page, "run")

    for section, heading in (
        ("samplers", "Samplers"),
        ("served-models", "Served models"),
        ("deployments", "Loops deployments"),
    ):
        page.click(f'nav a[data-section="{section}"]')
        page.wait_for_url(f"**/console/{section}")
        page.locator("h1", has_text=heading).wait_for(timeout=WAIT_MS)
        shots(page, section)
    assert page.locator("#deployments td").count() > 0  # the run's trainer deployment
    ctx.close()

    # another org's key: the run is a 404 page
    other = browser.new_context()
    page = other.new_page()
    sign_in(page, server.base_url, new_tenant(server, "console-other-org"), f"/console/runs/{run_id}")
    page.wait_for_url(at(f"/console/runs/{run_id}"))
    page.locator("h1[data-page=not-found]").wait_for(timeout=WAIT_MS)
    assert "404" in page.locator("h1").inner_text()
    shots(page, "not-found")
    other.close()
    tc.save_state("console-end").result()


def test_an_org_admin_manages_keys_and_a_revoked_key_is_signed_out(
    live_server: LiveServer, browser: Any, shots: Any
) -> None:
    server = live_server
    admin_key = new_tenant(server, "console-admin", [s.value for s in Scope], org_id=server.org_id)
    plain_key = new_tenant(server, "console-plain", None, org_id=server.org_id)

    # a key without the scope sees no keys page, and the API refuses it
    ctx = browser.new_context()
    page = ctx.new_page()
    sign_in(page, server.base_url, plain_key)
    page.wait_for_url("**/console/runs")
    assert page.locator("#nav-keys").is_hidden()
    r = httpx.get(f"{server.base_url}/v1/openloops/api_keys", headers={"Authorization": f"Api-Key {plain_key}"})
    assert r.status_code == 403 and "manage_org_api_keys" in r.json()["detail"]

    # the admin creates a key: shown once; it works
    admin = browser.new_context()
    apage = admin.new_page()
    sign_in(apage, server.base_url, admin_key)
    apage.wait_for_url("**/console/runs")
    apage.click("#nav-keys")
    apage.wait_for_url("**/console/keys")
    apage.fill("#key-name", "from the console")
    apage.click("form.filters button[type=submit]")
    secret = apage.locator("#new-secret")
    secret.wait_for(timeout=WAIT_MS)
    new_key = secret.inner_text().strip()
    who = httpx.get(f"{server.base_url}/v1/openloops/whoami", headers={"Authorization": f"Api-Key {new_key}"})
    assert who.status_code == 200 and who.json()["org_id"] == server.org_id
    assert "manage_org_api_keys" not in who.json()["scopes"]  # the default: the training scopes
    apage.locator("#keys tr").filter(has_text="from the console").wait_for(timeout=WAIT_MS)
    shots(apage, "keys")

    # the plain key's tab is signed out once the admin revokes that key
    plain_row = apage.locator("#keys tr").filter(has_text="console-plain@example.com")
    apage.once("dialog", lambda d: d.accept())
    plain_row.locator("button").click()
    plain_row.wait_for(state="detached", timeout=WAIT_MS)
    page.wait_for_url("**/console/sign-in**", timeout=WAIT_MS)
    page.locator(".error", has_text="Signed out").wait_for(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('openloops.apiKey')") is None
    shots(page, "signed-out")
    gone = httpx.get(f"{server.base_url}/v1/openloops/whoami", headers={"Authorization": f"Api-Key {plain_key}"})
    assert gone.status_code == 401
    admin.close()
    ctx.close()
