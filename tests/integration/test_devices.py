"""Device key upload against a real Synapse: recovering from an account that forgot an upload."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import nio

from bridge.matrix.devices import upload_keys
from tests.fixtures.synapse import SynapseHarness


def _client(hs: SynapseHarness, store: Path, user_id: str, device_id: str,
            token: str) -> nio.AsyncClient:
    client = nio.AsyncClient(hs.synapse.url, user_id, device_id, store_path=str(store),
                             config=nio.AsyncClientConfig(store_sync_tokens=False))
    client.restore_login(user_id, device_id, token)
    return client


async def test_upload_recovers_when_the_saved_account_missed_an_upload(
        synapse: SynapseHarness, tmp_path: Path) -> None:
    """A crash between the server accepting one-time keys and nio saving the account:
    the restored account draws different keys with the same ids, which the server
    refuses for ever; `upload_keys` drops them and uploads fresh ones."""
    localpart = f"dev_{secrets.token_hex(3)}"
    await synapse.synapse.register_user(localpart, "pw-dev-1")
    user_id, token, device_id = await synapse.synapse.login(localpart, "pw-dev-1", "CRASHDEV")
    store, snapshot = tmp_path / "store", tmp_path / "snapshot"
    store.mkdir()

    first = _client(synapse, store, user_id, device_id, token)
    shutil.copytree(store, snapshot)  # the account as saved before the upload
    assert isinstance(await first.keys_upload(), nio.KeysUploadResponse)
    await first.close()
    shutil.rmtree(store)
    shutil.copytree(snapshot, store)

    restored = _client(synapse, store, user_id, device_id, token)
    try:
        assert restored.should_upload_keys
        refused = await restored.keys_upload()  # what a plain retry gets, every time
        assert isinstance(refused, nio.KeysUploadError)
        assert "already exists" in (refused.message or "")

        await upload_keys(restored)
        assert restored.olm is not None and restored.olm.account.shared
    finally:
        await restored.close()

    # The account saved after the recovery is the one the next start loads.
    again = _client(synapse, store, user_id, device_id, token)
    try:
        assert again.olm is not None and again.olm.account.shared
        assert again.olm.account.identity_keys == restored.olm.account.identity_keys
    finally:
        await again.close()
