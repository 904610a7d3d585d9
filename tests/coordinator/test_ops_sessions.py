"""An ops browser session lives only as long as the admin token it was opened with: ops who change the
token (it leaked, someone left) sign out every browser the old one signed in.

Each coordinator runs in-process (TestClient, lifespan included); "restarting" is a second app on the
same data dir with other settings, as ops restart the service with a new SWARM_ADMIN_TOKEN.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from compute_swarm.coordinator.app import create_app
from tests.coordinator.test_web import ADMIN_TOKEN, OPS_COOKIE, ORIGIN, ops_sign_in, settings_for

OTHER_TOKEN = secrets.token_urlsafe(24)


def signed_in_cookie(tmp_path, token: str) -> str:
    with TestClient(
        create_app(settings_for(tmp_path, admin_token=token)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        assert ops_sign_in(client, token).status_code == 303
        assert client.get("/api/ops/overview").status_code == 200
        return client.cookies[OPS_COOKIE]


def restarted(tmp_path, token: str, cookie: str) -> TestClient:
    client = TestClient(
        create_app(settings_for(tmp_path, admin_token=token)), base_url=ORIGIN, follow_redirects=False
    )
    client.cookies.set(OPS_COOKIE, cookie)
    return client


def test_a_new_admin_token_ends_the_ops_sessions_of_the_old_one(tmp_path):
    cookie = signed_in_cookie(tmp_path, ADMIN_TOKEN)

    with restarted(tmp_path, OTHER_TOKEN, cookie) as client:
        assert client.get("/api/ops/overview").status_code == 401
        page = client.get("/ops")
        assert page.status_code == 303 and urlsplit(page.headers["location"]).path == "/ops/sign-in"
        # The new token signs in as before.
        assert ops_sign_in(client, OTHER_TOKEN).status_code == 303
        assert client.get("/api/ops/overview").status_code == 200


def test_an_ops_session_survives_a_restart_with_the_same_token(tmp_path):
    cookie = signed_in_cookie(tmp_path, ADMIN_TOKEN)
    with restarted(tmp_path, ADMIN_TOKEN, cookie) as client:
        assert client.get("/api/ops/overview").status_code == 200
