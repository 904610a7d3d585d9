"""A buyer's live (/v1) requests on the account page and at GET /api/inference-requests: each with its
tokens and charge, newest first, bounded, with totals over all of them, and only the buyer's own; and
the ops page's payout queue section. Requests are made through the coordinator's own inference service
(open, then settled or failed, as /v1 does with a node); tests/browser/test_sweep_page.py makes a real
one through the playground, and tests/browser/test_payout_queue_page.py drives the payout queue."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from compute_swarm.coordinator.app import create_app
from compute_swarm.coordinator.service import accounts
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.protocol import format_credits
from tests.coordinator.test_web import (
    ORIGIN,
    as_other_browser,
    bearer,
    ops_sign_in,
    settings_for,
    sign_up,
)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings_for(tmp_path)), base_url=ORIGIN, follow_redirects=False) as client:
        yield client


def buyer_id_of(client: TestClient, api_key: str) -> str:
    with client.app.state.services.database.reading() as session:
        return accounts.buyer_for_key(session, api_key).id


def make_requests(
    client: TestClient, api_key: str, answered: list[tuple[int, int]], failed: int = 0
) -> list[str]:
    """Requests the buyer made: answered ones settled for (prompt, completion) tokens, failed ones
    refunded; their ids, oldest first."""
    services = client.app.state.services
    buyer_id = buyer_id_of(client, api_key)
    model = services.inference.resolve(buyer_id, DEFAULT_MODEL)
    node = client.post("/api/nodes/register", json={"name": "server"})
    assert node.status_code == 201, node.text
    made = []
    for prompt_tokens, completion_tokens in answered:
        request_id = services.inference.open(buyer_id, model, max_tokens=64, prompt_bound=200)
        services.inference.settle(request_id, model, node.json()["node_id"], prompt_tokens, completion_tokens)
        made.append(request_id)
    for _ in range(failed):
        request_id = services.inference.open(buyer_id, model, max_tokens=64, prompt_bound=200)
        services.inference.fail(request_id, "the node went away")
        made.append(request_id)
    return made


def test_the_api_lists_a_buyers_requests_with_their_tokens_and_charges(client):
    api_key, _csrf = sign_up(client)
    made = make_requests(client, api_key, [(30, 10), (12, 40)], failed=1)
    balance_before_open = client.get("/api/balance").json()["available_micro"]
    services = client.app.state.services
    still_open = services.inference.open(
        buyer_id_of(client, api_key),
        services.inference.resolve(buyer_id_of(client, api_key), DEFAULT_MODEL),
        max_tokens=64,
        prompt_bound=200,
    )

    answer = client.get("/api/inference-requests", headers=bearer(api_key))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rows = body["requests"]
    assert [row["id"] for row in rows] == [still_open, *reversed(made)]  # newest first
    by_id = {row["id"]: row for row in rows}
    first, second, failed = (by_id[request_id] for request_id in made)
    assert (first["prompt_tokens"], first["completion_tokens"], first["state"]) == (30, 10, "completed")
    assert first["price_micro"] > 0 and first["held_micro"] >= first["price_micro"]
    assert first["model"] == DEFAULT_MODEL and first["finished_at"] >= first["created_at"]
    assert (failed["state"], failed["price_micro"], failed["error"]) == ("failed", 0, "the node went away")
    assert (by_id[still_open]["state"], by_id[still_open]["price_micro"]) == ("open", 0)
    # The totals cover every request; what they charged is what left the balance.
    assert body["totals"] == {
        "requests": 4,
        "prompt_tokens": 42,
        "completion_tokens": 50,
        "charged_micro": first["price_micro"] + second["price_micro"],
    }
    ledger = client.get("/api/ledger", params={"limit": 1000}).json()
    spent = -sum(line["amount_micro"] for line in ledger if line["job_id"] in made)
    assert spent == body["totals"]["charged_micro"]
    assert (
        client.get("/api/balance").json()["available_micro"]
        == balance_before_open - by_id[still_open]["held_micro"]
    )

    # Bounded by `limit`, the totals still over all of them.
    newest = client.get("/api/inference-requests", params={"limit": 2}).json()
    assert [row["id"] for row in newest["requests"]] == [still_open, made[-1]]
    assert newest["totals"]["requests"] == 4
    for limit in (0, 501, -1):
        assert client.get("/api/inference-requests", params={"limit": limit}).status_code == 422

    # Another buyer has none of them; nobody signed in gets nothing.
    as_other_browser(client)
    other_key, _ = sign_up(client, "someone else")
    others = client.get("/api/inference-requests", headers=bearer(other_key)).json()
    assert others == {
        "requests": [],
        "totals": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "charged_micro": 0},
    }
    client.cookies = type(client.cookies)()
    assert client.get("/api/inference-requests").status_code == 401


def test_the_account_page_lists_the_newest_requests_with_a_total_line(client, monkeypatch):
    api_key, _csrf = sign_up(client)
    empty = client.get("/account").text
    assert "No requests yet" in empty and 'href="/playground"' in empty

    monkeypatch.setattr("compute_swarm.coordinator.transport.web.buyer_pages.LISTED_REQUESTS", 2)
    made = make_requests(client, api_key, [(30, 10), (12, 40), (7, 5)], failed=1)
    page = client.get("/account").text
    listed = re.findall(r'<tr id="(req_\w+)">', page)
    assert listed == [made[3], made[2]]  # the newest two
    total = re.search(r'<p class="muted small" id="requests-total">(.*?)</p>', page).group(1)
    charged = client.get("/api/inference-requests").json()["totals"]["charged_micro"]
    assert total.startswith("4 requests in all (the newest 2 below): 49 prompt + 55 answer tokens, ")
    assert total.endswith(f"{format_credits(charged)} credits charged.")
    assert "the node went away" in page
    # The ledger's lines name the request they belong to, linked to its row.
    assert f'href="#{made[2]}"' in page


def test_the_ops_page_has_the_payout_queue_and_its_export_form(client):
    assert ops_sign_in(client).status_code == 303
    page = client.get("/ops").text
    for part in ('id="payout-queue"', 'id="export-form"', 'id="export-currency"', 'id="export-rate"'):
        assert part in page, part
    queue = client.get("/api/ops/payouts").json()
    assert queue["payouts"] == [] and queue["default_rate"] == {"currency": "USD", "rate": "0.0005"}
