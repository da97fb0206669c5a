"""The operator's client for the signer: a flood of calls queues for a slot instead of timing out."""
from __future__ import annotations

import asyncio

from aiohttp import web

from keyroom.signer.client import SignerClient


def test_calls_beyond_the_connections_wait_for_a_slot_and_none_times_out(tmp_path):
    """10 calls, 2 connections, answers taking 0.3 s, a 1 s timeout: the last ones wait 1.2 s for a slot.

    aiohttp counts the wait for a pooled connection against the timeout, so without the client's own slots
    the later calls would fail as SignerUnreachable while the signer is merely busy.
    """
    token = tmp_path / "token"
    token.write_text("operator-token")

    async def scenario():
        inside, most = 0, 0

        async def answer(request: web.Request) -> web.Response:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.3)
            inside -= 1
            return web.json_response({"state": "Signed"})
        app = web.Application()
        app.router.add_get("/v1/requests/{namespace}/{name}/{uid}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        client = SignerClient(url=f"http://127.0.0.1:{port}", token_file=str(token), timeout=1.0, connections=2)
        try:
            answers = await asyncio.gather(*(client.request_outcome(namespace="team-a", name=f"r{n}", uid="u")
                                             for n in range(10)), return_exceptions=True)
        finally:
            await client.close()
            await runner.cleanup()
        return answers, most
    answers, most = asyncio.run(scenario())
    assert [a if isinstance(a, Exception) else a["state"] for a in answers] == ["Signed"] * 10
    assert most <= 2
