"""On Kubernetes, label our own pod `civic-bridge/role: active|standby`.

The Service selects the active pod by this label (deploy/kubernetes/service.yaml), so
Synapse's transactions and Meta's webhooks reach the process that holds the leader
lock. Everything here is optional: it runs only inside a pod that has POD_NAME and
POD_NAMESPACE (downward API) and a mounted service-account token; anywhere else
`PodLabeler.from_environment` returns None and nothing is labelled.

A label change is a JSON merge patch of the pod's metadata, retried with backoff
until it sticks (a missed `active` label would leave the Service without endpoints)
or until the next role replaces it. The token is read for every request: bound
service-account tokens are rotated by the kubelet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)

ROLE_LABEL = "civic-bridge/role"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PodLabeler:
    """Sets the role label on one pod through the Kubernetes API."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, namespace: str, pod: str,
                 token_path: Path, ca_path: Path | None = None) -> None:
        self._http = http
        self._url = f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self._token_path = token_path
        self._ca_path = ca_path
        self._ssl: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def from_environment(cls, http: aiohttp.ClientSession,
                               environ: Mapping[str, str] = os.environ,
                               sa_dir: Path = SA_DIR) -> PodLabeler | None:
        """A labeler for the pod we run in, or None outside Kubernetes."""
        pod, namespace = environ.get("POD_NAME"), environ.get("POD_NAMESPACE")
        host = environ.get("KUBERNETES_SERVICE_HOST")
        token = sa_dir / "token"
        if not (pod and namespace and host) or not await asyncio.to_thread(token.is_file):
            return None
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(http, api, namespace, pod, token, sa_dir / "ca.crt")

    def set(self, role: str) -> None:
        """Label the pod with `role` in the background (replaces a pending change)."""
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(self._until_applied(role), name="pod label")

    async def settle(self) -> None:
        """Wait for the pending change (bound it with `asyncio.timeout`: it retries)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _until_applied(self, role: str) -> None:
        delay = 1.0
        while True:
            try:
                await self.apply(role)
                log.info("pod labelled %s=%s", ROLE_LABEL, role)
                return
            except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as exc:
                log.warning("cannot label the pod %s (%s); retrying in %.0fs", role,
                            type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def apply(self, role: str) -> None:
        """One PATCH; raises aiohttp.ClientResponseError on a refusal."""
        token = (await asyncio.to_thread(self._token_path.read_text, encoding="utf-8")).strip()
        if self._ssl is None and self._ca_path is not None:
            self._ssl = await asyncio.to_thread(ssl.create_default_context,
                                                cafile=str(self._ca_path))
        async with self._http.patch(
            self._url, data=json.dumps({"metadata": {"labels": {ROLE_LABEL: role}}}),
            headers={"Authorization": f"Bearer {token}",
                     "Content-Type": "application/merge-patch+json"},
            ssl=self._ssl if self._ssl is not None else True,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            resp.raise_for_status()
