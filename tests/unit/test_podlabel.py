"""Pod self-labelling against a recording fake of the Kubernetes API (loopback HTTP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.podlabel import ROLE_LABEL, PodLabeler


class FakeKubeAPI:
    """Records PATCHes of pods; fails the first `fail` of them with 503."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.labels: dict[str, str] = {}
        app = web.Application()
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{pod}", self._patch)
        self.server = TestServer(app)

    async def _patch(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.calls.append({"path": request.path, "auth": request.headers.get("Authorization"),
                           "type": request.headers.get("Content-Type"), "body": body})
        if self.fail:
            self.fail -= 1
            return web.json_response({"kind": "Status"}, status=503)
        self.labels.update(body["metadata"]["labels"])
        return web.json_response({"metadata": {"labels": self.labels}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("sa-token-1\n", encoding="utf-8")
    return path


async def test_labels_the_pod_with_a_merge_patch(http: aiohttp.ClientSession,
                                                 token: Path) -> None:
    api = FakeKubeAPI()
    await api.server.start_server()
    try:
        labeler = PodLabeler(http, str(api.server.make_url("/")), "civic-bridge", "cb-0", token)
        labeler.set("active")
        async with asyncio.timeout(5):
            await labeler.settle()
        [call] = api.calls
        assert call == {"path": "/api/v1/namespaces/civic-bridge/pods/cb-0",
                        "auth": "Bearer sa-token-1", "type": "application/merge-patch+json",
                        "body": {"metadata": {"labels": {ROLE_LABEL: "active"}}}}
        # The kubelet rotates the token file; every request reads it again.
        token.write_text("sa-token-2", encoding="utf-8")
        labeler.set("standby")
        async with asyncio.timeout(5):
            await labeler.settle()
        assert api.calls[-1]["auth"] == "Bearer sa-token-2"
        assert api.labels == {ROLE_LABEL: "standby"}
        await labeler.close()
    finally:
        await api.server.close()


async def test_retries_until_the_label_sticks(http: aiohttp.ClientSession,
                                              token: Path) -> None:
    api = FakeKubeAPI(fail=1)
    await api.server.start_server()
    try:
        labeler = PodLabeler(http, str(api.server.make_url("/")), "ns", "pod", token)
        labeler.set("active")
        async with asyncio.timeout(10):
            await labeler.settle()
        assert len(api.calls) == 2
        assert api.labels == {ROLE_LABEL: "active"}
        await labeler.close()
    finally:
        await api.server.close()


async def test_only_inside_a_pod(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    env = {"POD_NAME": "cb-0", "POD_NAMESPACE": "civic-bridge",
           "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    # No service-account token mounted (automountServiceAccountToken: false).
    assert await PodLabeler.from_environment(http, env, sa_dir=tmp_path) is None
    (tmp_path / "token").write_text("t", encoding="utf-8")
    for missing in ("POD_NAME", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
        partial = {k: v for k, v in env.items() if k != missing}
        assert await PodLabeler.from_environment(http, partial, sa_dir=tmp_path) is None
    labeler = await PodLabeler.from_environment(http, env, sa_dir=tmp_path)
    assert labeler is not None
    assert labeler._url == "https://10.0.0.1:443/api/v1/namespaces/civic-bridge/pods/cb-0"
    v6 = await PodLabeler.from_environment(http, {**env, "KUBERNETES_SERVICE_HOST": "fd00::1"},
                                           sa_dir=tmp_path)
    assert v6 is not None and v6._url.startswith("https://[fd00::1]:443/")
