"""WakeHub.watch_any: one wait over many keys, woken by any of them, saying which."""

from __future__ import annotations

import asyncio

from orchestrator.services.wakeups import WakeHub


def test_watch_any_wakes_on_any_of_its_keys_and_names_them() -> None:
    async def body() -> None:
        hub = WakeHub()
        hub.bind(asyncio.get_running_loop())
        watch = asyncio.create_task(hub.watch_any(["job:a", "job:b", "job:c"], 30.0))
        await asyncio.sleep(0)  # the watch is registered
        hub.notify_waiting("job:zzz")  # nobody's key: wakes nothing
        hub.notify_waiting("job:b")
        assert await watch == {"job:b"}  # a timeout would name no key
        assert hub._groups == {}  # nothing kept once the watch is over

        # a quiet wait ends at the fallback with no key named
        assert await hub.watch_any(["job:a"], 0.05) == set()

    asyncio.run(body())
