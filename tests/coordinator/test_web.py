"""The coordinator's web page, driven as a browser drives it: sign-up and sign-in, the session cookie,
CSRF and Origin checks, ownership, API keys, the launch form, the ops page, headers and page weight
(the sweep pages: test_web_sweeps.py; the account's requests and the payout queue: test_web_requests.py).

Each test runs its own coordinator in-process (TestClient, lifespan included) on a fresh data dir.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select, update

from compute_swarm.coordinator.app import create_app
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.tables import ApiKey, Buyer, Job
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET

ORIGIN = "http://127.0.0.1:8000"
EVIL = "http://evil.example"
SIGNUP_CREDITS = 50_000_000
ADMIN_TOKEN = secrets.token_urlsafe(24)  # 32 characters
SESSION_COOKIE, OPS_COOKIE = "swarm_session", "swarm_ops_session"
PAGE_BUDGET_BYTES = 300 * 1024

META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
FORM_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
NEW_KEY = re.compile(r'<code id="new-key">([^<]+)</code>')
LINKS = re.compile(r'(?:href|src|action)="([^"]*)"')


# ---- helpers


def settings_for(tmp_path: Path, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path,
        "allow_signup": True,
        "signup_credits_micro": SIGNUP_CREDITS,
        "admin_token": ADMIN_TOKEN,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings_for(tmp_path)), base_url=ORIGIN, follow_redirects=False) as client:
        yield client


def browser_headers(csrf: str | None = None, origin: str | None = ORIGIN) -> dict[str, str]:
    headers = {}
    if origin is not None:
        headers["Origin"] = origin
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return headers


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def page_csrf(response) -> str:
    """The CSRF token a page gives its scripts (the meta tag); its forms carry the same."""
    assert response.status_code == 200, response.text
    found = META_CSRF.search(response.text)
    assert found, "the page has no csrf-token meta tag"
    return found.group(1)


def form_csrf(response) -> str:
    found = FORM_CSRF.search(response.text)
    assert found, "the page has no form with a csrf_token"
    return found.group(1)


def session_csrf(client: TestClient) -> str:
    """The signed-in session's token, as a page shows it."""
    return page_csrf(client.get("/jobs"))


def set_cookie_headers(response, name: str) -> list[str]:
    return [value for value in response.headers.get_list("set-cookie") if value.startswith(f"{name}=")]


def sign_up(client: TestClient, name: str = "") -> tuple[str, str]:
    """A new buyer through the sign-up form; the client holds its session. Returns (api_key, csrf)."""
    csrf = form_csrf(client.get("/sign-in"))
    answer = client.post("/sign-up", data={"name": name, "csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert answer.status_code == 200, answer.text
    found = NEW_KEY.search(answer.text)
    assert found, "the sign-up answer shows no API key"
    return found.group(1), session_csrf(client)


def sign_in(client: TestClient, api_key: str, next_path: str = "/jobs"):
    csrf = form_csrf(client.get("/sign-in"))
    return client.post(
        "/sign-in",
        data={"api_key": api_key, "next": next_path, "csrf_token": csrf},
        headers={"Origin": ORIGIN},
    )


def as_other_browser(client: TestClient):
    """Forget this browser's cookies (returning them) so the next sign-up is someone else."""
    saved = client.cookies
    forget_cookies(client)
    return saved


def forget_cookies(client: TestClient) -> None:
    client.cookies = type(client.cookies)()


def upload_dataset(client: TestClient, api_key: str, lines: int = 20, filename: str = "chat.jsonl") -> str:
    """A dataset uploaded through the resumable uploads API; returns its file id."""
    data = b"".join(DEMO_CHAT_DATASET.read_bytes().splitlines(keepends=True)[:lines])
    created = client.post(
        "/api/uploads",
        json={
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "filename": filename,
            "purpose": "dataset",
        },
        headers=bearer(api_key),
    )
    assert created.status_code == 201, created.text
    sent = client.patch(
        f"/api/uploads/{created.json()['upload_id']}",
        content=data,
        headers={**bearer(api_key), "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert sent.status_code == 200, sent.text
    assert sent.json()["complete"], sent.json()
    return sent.json()["file"]["id"]


def submit_job(client: TestClient, api_key: str, file_id: str, max_steps: int = 3) -> str:
    answer = client.post(
        "/api/jobs",
        json={"spec": {"dataset": file_id, "base_model": "smollm2-135m-instruct", "max_steps": max_steps}},
        headers=bearer(api_key),
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def spec(file_id: str, **fields) -> dict:
    return {"spec": {"dataset": file_id, "base_model": "smollm2-135m-instruct", "max_steps": 3, **fields}}


def count(client: TestClient, table, *where) -> int:
    with client.app.state.services.database.reading() as session:
        return session.scalar(select(func.count()).select_from(table).where(*where))


def ops_sign_in(client: TestClient, token: str = ADMIN_TOKEN):
    csrf = form_csrf(client.get("/ops/sign-in"))
    return client.post(
        "/ops/sign-in", data={"admin_token": token, "csrf_token": csrf}, headers={"Origin": ORIGIN}
    )


def field_error(page: str, field: str) -> str | None:
    found = re.search(rf'<p class="field-error" id="{field}-error" role="alert">([^<]*)</p>', page)
    return found.group(1) if found else None


def input_value(page: str, field: str) -> str | None:
    found = re.search(rf'<input id="{field}" name="{field}"[^>]*value="([^"]*)"', page)
    return found.group(1) if found else None


# ---- 1. signing up


def test_sign_up_shows_the_key_once_opens_a_session_and_grants_credits(client):
    csrf = form_csrf(client.get("/sign-in"))
    answer = client.post("/sign-up", data={"name": "ada", "csrf_token": csrf}, headers={"Origin": ORIGIN})

    assert answer.status_code == 200
    api_key = NEW_KEY.search(answer.text).group(1)
    assert api_key.startswith("swarm-buyer-")
    assert "Welcome, ada" in answer.text
    [cookie] = set_cookie_headers(answer, SESSION_COOKIE)
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/" in attributes
    assert f"max-age={7 * 24 * 3600}" in attributes
    assert "secure" not in attributes  # plain http here; https would add it

    # The browser is signed in, with the sign-up credits.
    balance = client.get("/api/balance")
    assert balance.status_code == 200
    assert balance.json() == {"available_micro": SIGNUP_CREDITS, "escrow_micro": 0}
    assert 'title="signed in as">ada<' in client.get("/jobs").text

    # The key works on its own, as a program would use it.
    forget_cookies(client)
    assert client.get("/api/balance").status_code == 401
    by_key = client.get("/api/balance", headers=bearer(api_key))
    assert by_key.status_code == 200 and by_key.json()["available_micro"] == SIGNUP_CREDITS

    # Shown once: the account page afterwards has its hint only.
    assert sign_in(client, api_key).status_code == 303
    account = client.get("/account").text
    assert api_key not in account
    assert f"swarm-buyer-…{api_key[-4:]}" in account


def test_sign_up_needs_the_anonymous_csrf_token_and_our_origin(client):
    csrf = form_csrf(client.get("/sign-in"))
    for data, headers in [
        ({"csrf_token": csrf}, {}),  # no Origin
        ({"csrf_token": csrf}, {"Origin": EVIL}),
        ({"csrf_token": "x" * 43}, {"Origin": ORIGIN}),
        ({}, {"Origin": ORIGIN}),
    ]:
        refused = client.post("/sign-up", data=data, headers=headers)
        assert refused.status_code == 403, (data, headers)
        assert set_cookie_headers(refused, SESSION_COOKIE) == []
    assert count(client, Buyer) == 0


def test_sign_up_names_are_checked_and_shown_escaped(client):
    name = "<img src=x onerror=alert(1)>"
    sign_up(client, name)
    assert "<img src=x" not in client.get("/jobs").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in client.get("/account").text
    as_other_browser(client)

    csrf = form_csrf(client.get("/sign-in"))
    taken = client.post("/sign-up", data={"name": name, "csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert taken.status_code == 422
    assert "exists already" in field_error(taken.text, "name")
    assert 'value="&lt;img src=x onerror=alert(1)&gt;"' in taken.text  # kept in the form, escaped
    assert set_cookie_headers(taken, SESSION_COOKIE) == []
    assert count(client, Buyer) == 1


def test_a_flood_of_sign_ups_waits(tmp_path):
    settings = settings_for(tmp_path, signups_per_minute=2)
    with TestClient(create_app(settings), base_url=ORIGIN, follow_redirects=False) as client:
        sign_up(client)
        sign_up(client)
        csrf = form_csrf(client.get("/sign-in"))
        refused = client.post("/sign-up", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
        assert refused.status_code == 429
        assert "try again in a minute" in field_error(refused.text, "name")
        assert count(client, Buyer) == 2


def test_sign_up_is_refused_when_signups_are_off(tmp_path):
    settings = settings_for(tmp_path, allow_signup=False)
    with TestClient(create_app(settings), base_url=ORIGIN, follow_redirects=False) as client:
        sign_in_page = client.get("/sign-in")
        assert 'action="/sign-up"' not in sign_in_page.text
        refused = client.post(
            "/sign-up",
            data={"name": "mallory", "csrf_token": form_csrf(sign_in_page)},
            headers={"Origin": ORIGIN},
        )
        assert refused.status_code == 403
        assert "does not create accounts" in field_error(refused.text, "name")
        assert set_cookie_headers(refused, SESSION_COOKIE) == []
        assert "swarm-buyer-" not in refused.text.replace('placeholder="swarm-buyer-…"', "")
        assert count(client, Buyer) == 0


# ---- 2. signing in


def test_sign_in_with_a_wrong_key_shows_the_error_by_the_field(client):
    sign_up(client)  # an account exists; these keys are not its
    as_other_browser(client)
    for wrong, problem in [
        ("swarm-buyer-" + "x" * 43, "no account has this key"),
        ("sk-something-else", "not a buyer API key"),
        ("", "paste your API key"),
    ]:
        answer = sign_in(client, wrong)
        assert answer.status_code == 422
        assert problem in field_error(answer.text, "api_key")
        assert 'aria-describedby="api_key-error"' in answer.text
        assert set_cookie_headers(answer, SESSION_COOKIE) == []
        assert client.get("/jobs").status_code == 303


def test_sign_in_with_a_good_key_opens_a_session(client):
    api_key, _ = sign_up(client, "grace")
    as_other_browser(client)

    answer = sign_in(client, api_key)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/jobs"
    [cookie] = set_cookie_headers(answer, SESSION_COOKIE)
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    jobs = client.get("/jobs")
    assert jobs.status_code == 200 and 'title="signed in as">grace<' in jobs.text


def test_a_too_long_key_pasted_into_sign_in_gets_the_page_with_an_error(client):
    answer = sign_in(client, "swarm-buyer-" + "x" * 300)
    assert answer.status_code == 422
    assert "text/html" in answer.headers["content-type"]
    assert field_error(answer.text, "api_key")


@pytest.mark.parametrize(
    ("asked", "landing"),
    [
        ("/account", "/account"),
        ("//evil.example", "/jobs"),
        ("//evil.example/jobs", "/jobs"),
        ("/\\evil.example", "/jobs"),
        ("http://evil.example/", "/jobs"),
        ("javascript:alert(1)", "/jobs"),
    ],
)
def test_sign_in_follows_next_only_to_a_local_path(client, asked, landing):
    api_key, _ = sign_up(client)
    as_other_browser(client)
    # The sign-in page puts `next` into its form only when it is local.
    page = client.get("/sign-in", params={"next": asked}).text
    assert f'name="next" value="{landing}"' in page

    answer = sign_in(client, api_key, next_path=asked)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location == landing
    assert urlsplit(location).netloc == "" and not location.startswith("//")


def test_a_page_asked_for_signed_out_redirects_to_sign_in_and_back(client):
    api_key, _ = sign_up(client)
    as_other_browser(client)
    asked = client.get("/account")
    assert asked.status_code == 303
    assert asked.headers["location"] == "/sign-in?next=/account"
    assert 'name="next" value="/account"' in client.get(asked.headers["location"]).text
    assert sign_in(client, api_key, next_path="/account").headers["location"] == "/account"


# ---- 3. the key is never in a URL


def test_the_api_key_never_appears_in_a_url(client):
    visited = []
    csrf = form_csrf(client.get("/sign-in"))
    signed_up = client.post("/sign-up", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
    api_key = NEW_KEY.search(signed_up.text).group(1)
    visited.append(signed_up)
    file_id = upload_dataset(client, api_key)
    job_id = submit_job(client, api_key, file_id)

    created = client.post(
        "/account/keys",
        data={"name": "laptop", "csrf_token": session_csrf(client)},
        headers={"Origin": ORIGIN},
    )
    second_key = NEW_KEY.search(created.text).group(1)
    visited.append(created)
    as_other_browser(client)
    visited.append(sign_in(client, api_key, next_path="/files"))
    visited.append(sign_in(client, second_key))
    for path in ["/jobs", "/files", "/jobs/new", f"/jobs/{job_id}", "/playground", "/account", "/sign-in"]:
        visited.append(client.get(path))

    for response in visited:
        assert response.status_code in (200, 303), (response.url, response.status_code)
        urls = [str(response.url), response.headers.get("location", "")]
        urls += LINKS.findall(response.text)
        for url in urls:
            assert api_key not in url and second_key not in url, url
            assert "swarm-buyer-" not in url, url


# ---- 4. CSRF and Origin


@pytest.fixture
def signed_up(client):
    """A signed-in buyer with a dataset: (api_key, csrf, file_id)."""
    api_key, csrf = sign_up(client)
    return api_key, csrf, upload_dataset(client, api_key)


def unsafe_calls(file_id: str) -> list[tuple[str, dict, int]]:
    """Cookie-authenticated JSON calls that change (or price) something, and their success status."""
    return [("/api/jobs/quote", spec(file_id), 200), ("/api/keys", {"name": "from a script"}, 201)]


@pytest.mark.parametrize("call", [0, 1], ids=["quote", "create-key"])
def test_cookie_json_calls_need_the_csrf_token_and_our_origin(client, signed_up, call):
    _api_key, csrf, file_id = signed_up
    path, body, success = unsafe_calls(file_id)[call]
    keys_before = count(client, ApiKey)

    expired, elsewhere, unnamed = "this form has expired", "came from", "names no Origin"
    anonymous = client.cookies.get("swarm_csrf")
    assert anonymous and anonymous != csrf
    refusals = {
        "no token": (browser_headers(csrf=None), expired),
        "wrong token": (browser_headers(csrf="x" * 43), expired),
        "the sign-in page's token": (browser_headers(csrf=anonymous), expired),
        "other origin": (browser_headers(csrf=csrf, origin=EVIL), elsewhere),
        "null origin, no referer": (browser_headers(csrf=csrf, origin="null"), unnamed),
        "no origin, no referer": (browser_headers(csrf=csrf, origin=None), unnamed),
        "other referer": ({"X-CSRF-Token": csrf, "Referer": f"{EVIL}/jobs/new"}, "another site"),
    }
    for why, (headers, problem) in refusals.items():
        refused = client.post(path, json=body, headers=headers)
        assert refused.status_code == 403, why
        assert problem in refused.json()["detail"], why
    assert count(client, ApiKey) == keys_before

    works = client.post(path, json=body, headers=browser_headers(csrf=csrf))
    assert works.status_code == success, works.text
    # A browser that sends only a same-origin Referer (no Origin) passes too.
    by_referer = client.post(path, json=body, headers={"X-CSRF-Token": csrf, "Referer": f"{ORIGIN}/jobs/new"})
    assert by_referer.status_code == success, by_referer.text


@pytest.mark.parametrize("call", [0, 1], ids=["quote", "create-key"])
def test_bearer_calls_need_no_csrf_token(client, signed_up, call):
    api_key, _csrf, file_id = signed_up
    path, body, success = unsafe_calls(file_id)[call]
    # With the browser's cookie still in the jar, and without it: the key decides, not the cookie.
    assert client.post(path, json=body, headers=bearer(api_key)).status_code == success
    forget_cookies(client)
    answer = client.post(path, json=body, headers={**bearer(api_key), "Origin": EVIL})
    assert answer.status_code == success, answer.text


def test_a_form_post_without_its_csrf_field_is_refused(client, signed_up):
    _api_key, csrf, _file_id = signed_up
    keys_before = count(client, ApiKey)
    for data, headers in [
        ({"name": "no token"}, {"Origin": ORIGIN}),
        ({"name": "wrong token", "csrf_token": "x" * 43}, {"Origin": ORIGIN}),
        ({"name": "evil origin", "csrf_token": csrf}, {"Origin": EVIL}),
        ({"name": "no origin", "csrf_token": csrf}, {}),
    ]:
        refused = client.post("/account/keys", data=data, headers=headers)
        assert refused.status_code == 403, data
        assert "text/html" in refused.headers["content-type"]
        assert NEW_KEY.search(refused.text) is None
    assert count(client, ApiKey) == keys_before

    made = client.post("/account/keys", data={"name": "ok", "csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert made.status_code == 200 and NEW_KEY.search(made.text)
    assert count(client, ApiKey) == keys_before + 1


def test_signing_out_needs_the_csrf_token(client):
    _api_key, csrf = sign_up(client)
    assert client.post("/sign-out", headers={"Origin": ORIGIN}).status_code == 403
    assert client.get("/jobs").status_code == 200
    out = client.post("/sign-out", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert out.status_code == 303 and out.headers["location"] == "/sign-in"
    assert client.get("/jobs").status_code == 303


def behind_a_tls_proxy(client: TestClient) -> None:
    """As a browser talks to a TLS proxy that forwards plain http: it sends its Secure cookies,
    which the test client (talking http itself) would keep back."""
    send = client.send

    def send_with_every_cookie(request, **options):
        cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in client.cookies.jar)
        if cookies:
            request.headers["cookie"] = cookies
        return send(request, **options)

    client.send = send_with_every_cookie


def test_behind_a_proxy_posts_must_come_from_the_public_origin(tmp_path):
    public = "https://swarm.example.com"
    with TestClient(
        create_app(settings_for(tmp_path, public_origin=public)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        behind_a_tls_proxy(client)
        csrf = form_csrf(client.get("/sign-in"))
        for origin in (ORIGIN, EVIL):
            refused = client.post("/sign-up", data={"csrf_token": csrf}, headers={"Origin": origin})
            assert refused.status_code == 403, origin
        answer = client.post("/sign-up", data={"csrf_token": csrf}, headers={"Origin": public})
        assert answer.status_code == 200
        # Its cookies go only over https, as browsers reach it.
        [cookie] = set_cookie_headers(answer, SESSION_COOKIE)
        assert "secure" in [part.strip().lower() for part in cookie.split(";")]
        made = client.post(
            "/api/keys", json={"name": "x"}, headers=browser_headers(session_csrf(client), public)
        )
        assert made.status_code == 201


# ---- 5. ownership


def give_job_a_gguf(client: TestClient, job_id: str) -> bytes:
    """Pretend the job finished with a GGUF adapter (bytes in the store, the job pointing at them)."""
    services = client.app.state.services
    data = b"GGUF" + secrets.token_bytes(64)
    digest = hashlib.sha256(data).hexdigest()
    path = services.store.blob_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with services.database.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(result_gguf_sha256=digest))
    return data


def test_another_buyers_session_sees_none_of_a_job(client):
    a_key, _ = sign_up(client, "alice")
    job_id = submit_job(client, a_key, upload_dataset(client, a_key))
    gguf = give_job_a_gguf(client, job_id)
    job_paths = [
        f"/api/jobs/{job_id}",
        f"/api/jobs/{job_id}/progress",
        f"/api/jobs/{job_id}/events",
        f"/api/jobs/{job_id}/adapter.gguf",
    ]
    # Alice, through her browser, sees all of it.
    assert client.get(f"/jobs/{job_id}").status_code == 200
    for path in job_paths:
        assert client.get(path).status_code == 200, path
    assert client.get(f"/api/jobs/{job_id}/adapter.gguf").content == gguf
    alice = as_other_browser(client)

    b_key, b_csrf = sign_up(client, "bob")
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 404
    assert "Not found" in page.text and "alice" not in page.text
    for path in job_paths:
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["detail"] == f"no job {job_id!r}", path
        assert client.get(path, headers=bearer(b_key)).status_code == 404, path
    cancel = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": b_csrf}, headers={"Origin": ORIGIN})
    assert cancel.status_code == 404
    assert client.post(f"/api/jobs/{job_id}/cancel", headers=browser_headers(b_csrf)).status_code == 404
    assert job_id not in client.get("/jobs").text
    assert client.get("/api/jobs").json() == []

    client.cookies = alice
    assert client.get(f"/api/jobs/{job_id}").json()["state"] == "queued"


def test_another_buyers_session_cannot_use_a_dataset(client, signed_up):
    a_key, _a_csrf, file_id = signed_up
    as_other_browser(client)
    _b_key, b_csrf = sign_up(client, "bob")

    assert client.get(f"/api/files/{file_id}").status_code == 404
    assert file_id not in client.get("/files").text
    assert file_id not in client.get("/jobs/new", params={"dataset": file_id}).text.replace(
        f"/jobs/new?dataset={file_id}", ""
    )
    quote = client.post("/api/jobs/quote", json=spec(file_id), headers=browser_headers(b_csrf))
    assert quote.status_code == 422 and set(quote.json()["fields"]) == {"dataset"}
    launch = client.post("/jobs/new", data=launch_form(b_csrf, file_id), headers={"Origin": ORIGIN})
    assert launch.status_code == 422 and field_error(launch.text, "dataset")
    assert client.get("/api/jobs").json() == []
    assert client.get("/api/files", headers=bearer(a_key)).json()[0]["id"] == file_id


def test_cancelling_from_the_job_page_refunds_the_hold(client, signed_up):
    api_key, csrf, file_id = signed_up
    job_id = submit_job(client, api_key, file_id)
    page = client.get(f"/jobs/{job_id}")
    assert f'action="/jobs/{job_id}/cancel"' in page.text
    assert form_csrf(page) == page_csrf(page) == csrf  # one token per session, on every page
    assert client.get("/api/balance").json()["available_micro"] < SIGNUP_CREDITS

    answer = client.post(
        f"/jobs/{job_id}/cancel", data={"csrf_token": form_csrf(page)}, headers={"Origin": ORIGIN}
    )
    assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{job_id}"
    assert client.get(f"/api/jobs/{job_id}").json()["state"] == "cancelled"
    assert client.get("/api/balance").json() == {"available_micro": SIGNUP_CREDITS, "escrow_micro": 0}
    after = client.get(f"/jobs/{job_id}").text
    assert f'action="/jobs/{job_id}/cancel"' not in after and "cancelled" in after


def test_another_buyers_session_cannot_revoke_a_key(client):
    a_key, _ = sign_up(client, "alice")
    [a_key_row] = client.get("/api/keys", headers=bearer(a_key)).json()
    as_other_browser(client)
    _b_key, b_csrf = sign_up(client, "bob")

    answer = client.post(
        f"/account/keys/{a_key_row['id']}/revoke", data={"csrf_token": b_csrf}, headers={"Origin": ORIGIN}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/account"
    api = client.post(f"/api/keys/{a_key_row['id']}/revoke", headers=browser_headers(b_csrf))
    assert api.status_code == 404
    assert a_key_row["id"] not in client.get("/account").text

    [still] = client.get("/api/keys", headers=bearer(a_key)).json()
    assert still["revoked_at"] is None
    assert client.get("/api/balance", headers=bearer(a_key)).status_code == 200


# ---- 6. API keys


def test_a_key_made_on_the_account_page_is_shown_once_then_only_its_hint(client):
    first_key, csrf = sign_up(client)
    made = client.post(
        "/account/keys", data={"name": "ci runner", "csrf_token": csrf}, headers={"Origin": ORIGIN}
    )
    assert made.status_code == 200
    new_key = NEW_KEY.search(made.text).group(1)
    assert new_key.startswith("swarm-buyer-") and new_key != first_key
    assert "shown only now" in made.text

    again = client.get("/account").text
    assert new_key not in again and first_key not in again
    assert NEW_KEY.search(again) is None
    assert "ci runner" in again
    assert f"swarm-buyer-…{new_key[-4:]}" in again
    listed = client.get("/api/keys").json()
    assert {key["name"] for key in listed} == {"first key", "ci runner"}
    assert all("api_key" not in key for key in listed)
    assert client.get("/api/balance", headers=bearer(new_key)).status_code == 200


def test_a_key_name_is_checked_on_the_form(client):
    _key, csrf = sign_up(client)
    answer = client.post("/account/keys", data={"name": "  ", "csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert answer.status_code == 422
    assert "1 to 100 characters" in field_error(answer.text, "name")
    assert NEW_KEY.search(answer.text) is None
    assert len(client.get("/api/keys").json()) == 1


def test_revoking_the_key_a_browser_signed_in_with_ends_its_session(client):
    first_key, csrf = sign_up(client)
    made = client.post(
        "/account/keys", data={"name": "browser", "csrf_token": csrf}, headers={"Origin": ORIGIN}
    )
    browser_key = NEW_KEY.search(made.text).group(1)
    # A second browser signs in with the new key; the first stays on the sign-up's key.
    first_browser = as_other_browser(client)
    assert sign_in(client, browser_key).status_code == 303
    second_csrf = session_csrf(client)
    [row] = [key for key in client.get("/api/keys").json() if key["name"] == "browser"]

    revoked = client.post(
        f"/account/keys/{row['id']}/revoke", data={"csrf_token": second_csrf}, headers={"Origin": ORIGIN}
    )
    assert revoked.status_code == 303 and revoked.headers["location"] == "/account"
    after = client.get("/jobs")
    assert after.status_code == 303
    assert after.headers["location"] == "/sign-in?next=/jobs"
    assert client.get("/api/balance").status_code == 401
    assert client.get("/api/balance", headers=bearer(browser_key)).status_code == 401
    assert sign_in(client, browser_key).status_code == 422

    # The other browser, and the other key, are untouched; the list shows the key as revoked.
    client.cookies = first_browser
    account = client.get("/account")
    assert account.status_code == 200
    assert re.search(r'<tr class="revoked"><td>browser</td>', account.text)
    assert client.get("/api/balance", headers=bearer(first_key)).status_code == 200


# ---- 7. the launch form and the quote


def launch_form(csrf: str, file_id: str, **fields: str) -> dict[str, str]:
    form = {
        "csrf_token": csrf,
        "dataset": file_id,
        "base_model": "smollm2-135m-instruct",
        "max_steps": "3",
        "rank": "4",
        "alpha": "8",
        "learning_rate": "0.001",
        "batch_size": "2",
        "gradient_accumulation_steps": "1",
        "max_sequence_length": "256",
        "suffix": "pirate",
    }
    form.update(fields)
    return form


@pytest.mark.parametrize(
    ("field", "entered", "problem"),
    [
        ("max_steps", "0", "greater than or equal to 1"),
        ("max_steps", "abc", "a whole number"),
        ("max_steps", "", "required"),
        ("learning_rate", "fast", "a number"),
        ("rank", "0", "greater than or equal to 1"),
        ("suffix", "not ok!", "letters, digits"),
    ],
)
def test_the_launch_form_shows_each_problem_by_its_field_and_keeps_the_values(
    client, signed_up, field, entered, problem
):
    _api_key, csrf, file_id = signed_up
    answer = client.post(
        "/jobs/new", data=launch_form(csrf, file_id, **{field: entered}), headers={"Origin": ORIGIN}
    )

    assert answer.status_code == 422
    assert problem in field_error(answer.text, field)
    assert f'aria-describedby="{field}-error"' in answer.text
    # What was typed stays in the form.
    assert input_value(answer.text, field) == entered
    for kept, value in [("max_steps", "3"), ("rank", "4"), ("learning_rate", "0.001"), ("suffix", "pirate")]:
        if kept != field:
            assert input_value(answer.text, kept) == value, kept
    assert f'<option value="{file_id}" selected>' in answer.text
    if field in ("rank", "learning_rate"):
        assert '<details id="advanced" open>' in answer.text  # the field in trouble is shown
    assert client.get("/api/jobs").json() == []
    assert client.get("/api/balance").json()["available_micro"] == SIGNUP_CREDITS


def test_a_good_launch_form_starts_the_job(client, signed_up):
    _api_key, csrf, file_id = signed_up
    answer = client.post("/jobs/new", data=launch_form(csrf, file_id), headers={"Origin": ORIGIN})

    assert answer.status_code == 303
    job_id = answer.headers["location"].removeprefix("/jobs/")
    assert answer.headers["location"] == f"/jobs/{job_id}" and job_id.startswith("job_")
    [job] = client.get("/api/jobs").json()
    assert job["id"] == job_id and job["state"] == "queued"
    assert job["spec"]["max_steps"] == 3 and job["spec"]["rank"] == 4
    assert job["spec"]["learning_rate"] == 0.001
    page = client.get(answer.headers["location"])
    assert page.status_code == 200 and job_id in page.text
    balance = client.get("/api/balance").json()
    assert balance["escrow_micro"] == job["price_micro"] > 0
    assert balance["available_micro"] == SIGNUP_CREDITS - job["price_micro"]


def test_the_launch_form_needs_a_dataset_of_ones_own(client, signed_up):
    _api_key, csrf, _file_id = signed_up
    answer = client.post(
        "/jobs/new", data=launch_form(csrf, "file_0123456789abcdef"), headers={"Origin": ORIGIN}
    )
    assert answer.status_code == 422
    assert field_error(answer.text, "dataset")
    assert client.get("/api/jobs").json() == []


def test_the_quote_prices_a_spec_and_names_the_bad_fields(client, signed_up):
    api_key, csrf, file_id = signed_up
    quote = client.post("/api/jobs/quote", json=spec(file_id), headers=browser_headers(csrf))
    assert quote.status_code == 200, quote.text
    body = quote.json()
    assert body["price_micro"] > 0
    assert body["available_micro"] == SIGNUP_CREDITS
    assert body["affordable"] is True
    # The quote changes nothing, and matches what submitting holds.
    assert client.get("/api/balance").json()["available_micro"] == SIGNUP_CREDITS
    job_id = submit_job(client, api_key, file_id)
    assert client.get(f"/api/jobs/{job_id}").json()["price_micro"] == body["price_micro"]

    bad = client.post("/api/jobs/quote", json=spec(file_id, rank=0), headers=browser_headers(csrf))
    assert bad.status_code == 422
    assert set(bad.json()["fields"]) == {"rank"}
    assert "greater than or equal to 1" in bad.json()["fields"]["rank"]


def test_a_quote_beyond_the_balance_is_not_affordable(tmp_path):
    with TestClient(
        create_app(settings_for(tmp_path, signup_credits_micro=1)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        api_key, csrf = sign_up(client)
        file_id = upload_dataset(client, api_key)
        body = client.post("/api/jobs/quote", json=spec(file_id), headers=browser_headers(csrf)).json()
        assert body["available_micro"] == 1 and body["affordable"] is False
        answer = client.post("/jobs/new", data=launch_form(csrf, file_id), headers={"Origin": ORIGIN})
        assert answer.status_code == 422
        assert 'class="form-error" role="alert"' in answer.text and "Account page" in answer.text


# ---- 8. ops


def test_the_ops_page_needs_the_admin_token(client):
    asked = client.get("/ops")
    assert asked.status_code == 303
    assert urlsplit(asked.headers["location"]).path == "/ops/sign-in"

    wrong = ops_sign_in(client, "not-the-token-" + "x" * 20)
    assert wrong.status_code == 422
    assert field_error(wrong.text, "admin_token") == "this is not the admin token"
    assert set_cookie_headers(wrong, OPS_COOKIE) == []
    assert ADMIN_TOKEN not in wrong.text

    right = ops_sign_in(client)
    assert right.status_code == 303 and right.headers["location"] == "/ops"
    [cookie] = set_cookie_headers(right, OPS_COOKIE)
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    page = client.get("/ops")
    assert page.status_code == 200 and "The swarm" in page.text
    assert ADMIN_TOKEN not in page.text

    overview = client.get("/api/ops/overview")
    assert overview.status_code == 200
    body = overview.json()
    assert body["nodes"] == [] and body["queue_depth"] == 0
    assert set(body["jobs_by_state"]) >= {"queued", "completed"}
    assert all(value == 0 for value in body["jobs_by_state"].values())


def test_ops_session_posts_need_the_csrf_token(client):
    assert ops_sign_in(client).status_code == 303
    csrf = page_csrf(client.get("/ops"))
    refused = client.post("/api/ops/nodes/node_0123456789abcdef/revoke", headers=browser_headers())
    assert refused.status_code == 403
    elsewhere = client.post(
        "/api/ops/nodes/node_0123456789abcdef/revoke", headers=browser_headers(csrf, origin=EVIL)
    )
    assert elsewhere.status_code == 403
    # Past the checks: there is no such node.
    passed = client.post("/api/ops/nodes/node_0123456789abcdef/revoke", headers=browser_headers(csrf))
    assert passed.status_code == 404

    assert client.post("/ops/sign-out", headers={"Origin": ORIGIN}).status_code == 403
    out = client.post("/ops/sign-out", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert out.status_code == 303 and out.headers["location"] == "/ops/sign-in"
    assert client.get("/ops").status_code == 303
    assert client.get("/api/ops/overview").status_code == 401


def test_the_ops_overview_counts_queued_jobs(client):
    api_key, _ = sign_up(client)
    submit_job(client, api_key, upload_dataset(client, api_key))
    overview = client.get("/api/ops/overview", headers=bearer(ADMIN_TOKEN))
    assert overview.status_code == 200
    assert overview.json()["queue_depth"] == 1
    assert overview.json()["jobs_by_state"]["queued"] == 1


def test_the_ops_overview_takes_the_admin_token_as_bearer_and_refuses_buyers(client):
    forget_cookies(client)
    assert client.get("/api/ops/overview", headers=bearer(ADMIN_TOKEN)).status_code == 200
    assert client.get("/api/ops/overview").status_code == 401
    assert client.get("/api/ops/overview", headers=bearer("y" * 32)).status_code == 401

    api_key, _ = sign_up(client)
    assert client.get("/api/ops/overview").status_code in (401, 403)
    assert client.get("/api/ops/overview", headers=bearer(api_key)).status_code in (401, 403)
    assert client.get("/ops").status_code == 303


def test_the_ops_view_is_closed_without_an_admin_token(tmp_path):
    with TestClient(
        create_app(settings_for(tmp_path, admin_token=None)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        page = client.get("/ops/sign-in")
        assert page.status_code == 200
        assert "The ops view is closed" in page.text
        assert 'action="/ops/sign-in"' not in page.text
        assert client.get("/api/ops/overview").status_code == 403
        assert client.get("/api/ops/overview", headers=bearer("z" * 32)).status_code == 403
        tried = client.post(
            "/ops/sign-in",
            data={"admin_token": "z" * 32, "csrf_token": page_csrf(page)},
            headers={"Origin": ORIGIN},
        )
        assert tried.status_code == 422 and set_cookie_headers(tried, OPS_COOKIE) == []


@pytest.mark.parametrize(
    "token", ["changeme", "short-token", "CHANGEME", "a" * 23, "password", "a" * 32, "changeme" * 4]
)
def test_settings_refuse_a_short_or_placeholder_admin_token(tmp_path, token):
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(data_dir=tmp_path, admin_token=token)


def test_settings_take_a_long_random_admin_token(tmp_path):
    token = secrets.token_urlsafe(32)
    assert Settings(data_dir=tmp_path, admin_token=token).admin_token.get_secret_value() == token


# ---- 9. headers and page weight


def page_weight(client: TestClient, page) -> int:
    """The page's HTML plus every /static asset it links (src= or href=), each counted once."""
    total = len(page.content)
    assets = {url for url in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)}
    assert assets, "the page links no assets"
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200, url
        total += len(asset.content)
    return total


def test_every_page_has_the_security_headers_and_stays_small(client):
    pages = {"/sign-in": client.get("/sign-in"), "/ops/sign-in": client.get("/ops/sign-in")}
    api_key, _ = sign_up(client)
    file_id = upload_dataset(client, api_key)
    job_id = submit_job(client, api_key, file_id)
    sweep_spec = {"base": spec(file_id)["spec"], "parameters": {"rank": {"values": [4, 8]}}}
    sweep = client.post("/api/sweeps", json={"spec": sweep_spec}, headers=bearer(api_key))
    assert sweep.status_code == 201, sweep.text
    for path in [
        "/jobs",
        "/files",
        "/jobs/new",
        "/sweeps",
        f"/sweeps/{sweep.json()['id']}",
        "/playground",
        "/account",
        f"/jobs/{job_id}",
        "/jobs/job_nope",
    ]:
        pages[path] = client.get(path)
    assert ops_sign_in(client).status_code == 303
    pages["/ops"] = client.get("/ops")

    for path, page in pages.items():
        assert page.status_code == (404 if path == "/jobs/job_nope" else 200), path
        assert "text/html" in page.headers["content-type"], path
        policy = page.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert page.headers.get("x-frame-options") == "DENY", path
        assert page.headers.get("x-content-type-options") == "nosniff", path
        # No inline script: everything the page runs comes from /static.
        assert re.search(r"<script(?![^>]*\ssrc=)", page.text) is None, path
        weight = page_weight(client, page)
        assert weight <= PAGE_BUDGET_BYTES, (path, weight)


# ---- 10. expiry


def test_an_expired_session_no_longer_works(tmp_path):
    hours = 0.0002  # 0.72 s
    with TestClient(
        create_app(settings_for(tmp_path, session_hours=hours)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        csrf = form_csrf(client.get("/sign-in"))
        answer = client.post("/sign-up", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
        assert answer.status_code == 200
        api_key = NEW_KEY.search(answer.text).group(1)
        [cookie] = set_cookie_headers(answer, SESSION_COOKIE)
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        # Sent by hand: a browser would already drop a cookie with a Max-Age under a second.
        forget_cookies(client)
        by_cookie = {"Cookie": f"{SESSION_COOKIE}={value}"}
        assert client.get("/api/balance", headers=by_cookie).status_code == 200

        time.sleep(hours * 3600 + 0.1)
        assert client.get("/api/balance", headers=by_cookie).status_code == 401
        page = client.get("/jobs", headers=by_cookie)
        assert page.status_code == 303 and page.headers["location"] == "/sign-in?next=/jobs"
        # The key itself still works, and signs in anew.
        assert client.get("/api/balance", headers=bearer(api_key)).status_code == 200
        assert sign_in(client, api_key).status_code == 303
