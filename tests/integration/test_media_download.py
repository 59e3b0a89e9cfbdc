"""Media downloads from Graph (the simulator over HTTP): per-type caps, refused before
or while streaming, one buffer hashed as it fills."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bridge.devtools.simulator import CloudAPISimulator
from bridge.whatsapp.graph import GraphClient, MediaIntegrityError, MediaTooLarge
from bridge.whatsapp.limits import MEDIA_LIMITS, media_limit

pytestmark = pytest.mark.integration

TOKEN = "test-token-" + secrets.token_hex(8)
PHONE_ID = "106540352242922"


@pytest.fixture
async def wa() -> AsyncIterator[tuple[CloudAPISimulator, GraphClient]]:
    simulator = CloudAPISimulator(TOKEN, secrets.token_hex(8), PHONE_ID, "+34 910 000 000")
    api_base = await simulator.start()
    async with aiohttp.ClientSession() as session:
        yield simulator, GraphClient(session, api_base=api_base, phone_number_id=PHONE_ID,
                                     access_token=TOKEN)
    await simulator.stop()


def test_caps_are_metas_limits() -> None:
    assert MEDIA_LIMITS == {"image": 5 * 2**20, "video": 16 * 2**20, "audio": 16 * 2**20,
                            "document": 100 * 2**20, "sticker": 500 * 2**10}
    # Stickers: 100 KB static, 500 KB animated (or when the webhook does not say).
    assert media_limit("sticker", animated=False) == 100 * 2**10
    assert media_limit("sticker", animated=True) == media_limit("sticker") == 500 * 2**10
    assert media_limit("image", animated=False) == 5 * 2**20


@pytest.mark.parametrize("report_size", [True, False])
async def test_media_within_the_cap_streams_into_one_hashed_buffer(
        wa: tuple[CloudAPISimulator, GraphClient], report_size: bool) -> None:
    simulator, graph = wa
    data = secrets.token_bytes(300 * 1024)  # several chunks
    media_id = simulator.add_media(data, "image/jpeg", report_size=report_size)
    media = await graph.fetch_media(media_id, max_bytes=MEDIA_LIMITS["image"])
    assert isinstance(media.data, bytearray) and media.data == data
    assert media.sha256 == hashlib.sha256(data).digest() and media.mime_type == "image/jpeg"
    assert media.matches(hashlib.sha256(data).hexdigest())


async def test_oversize_media_reported_by_graph_is_never_downloaded(
        wa: tuple[CloudAPISimulator, GraphClient]) -> None:
    simulator, graph = wa
    limit = MEDIA_LIMITS["sticker"]
    media_id = simulator.add_media(b"R" * (limit + 1), "image/webp")
    with pytest.raises(MediaTooLarge) as info:
        await graph.fetch_media(media_id, max_bytes=limit)
    assert (info.value.size, info.value.limit, info.value.retryable) == (limit + 1, limit, False)
    downloads = [r for r in simulator.requests if r.path.startswith("/whatsapp_business/")]
    assert downloads == []


async def test_oversize_media_of_unknown_size_is_cut_off_at_the_cap(
        wa: tuple[CloudAPISimulator, GraphClient]) -> None:
    """No file_size, no Content-Length: the stream itself is counted and abandoned."""
    simulator, graph = wa
    limit = 256 * 1024
    media_id = simulator.add_media(b"V" * (limit * 4), "video/mp4", report_size=False)
    with pytest.raises(MediaTooLarge) as info:
        await graph.fetch_media(media_id, max_bytes=limit)
    assert info.value.size is None and info.value.limit == limit


async def test_tampered_media_fails_the_streamed_hash(
        wa: tuple[CloudAPISimulator, GraphClient]) -> None:
    simulator, graph = wa
    media_id = simulator.add_media(b"original bytes" * 9000, "application/pdf",
                                   report_size=False)
    simulator.tamper_media(media_id)
    with pytest.raises(MediaIntegrityError):
        await graph.fetch_media(media_id)
