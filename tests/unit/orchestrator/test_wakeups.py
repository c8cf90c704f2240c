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
        assert await watch == {"job:b": None}  # a timeout would name no key
        assert hub._groups == {}  # nothing kept once the watch is over

        # a quiet wait ends at the fallback with no key named
        assert await hub.watch_any(["job:a"], 0.05) == {}

    asyncio.run(body())


def test_watch_any_learns_the_states_a_commit_left_its_jobs_in() -> None:
    async def body() -> None:
        hub = WakeHub()
        hub.bind(asyncio.get_running_loop())
        watch = asyncio.create_task(hub.watch_any(["job:a", "job:b"], 30.0))
        stream = asyncio.create_task(hub.watch("stream:b", 30.0))
        await asyncio.sleep(0)
        # One commit's jobs in one call: watched ones say their state, others wake nothing.
        hub.notify_jobs({"b": "succeeded", "c": "running"})
        assert await watch == {"job:b": "succeeded"}
        await asyncio.wait_for(stream, 1.0)  # the job's stream reader is woken too
        assert hub._groups == {} and hub._events == {}

    asyncio.run(body())


def test_a_final_state_is_not_replaced_by_an_earlier_commits_late_wake_up() -> None:
    async def body() -> None:
        hub = WakeHub()
        hub.bind(asyncio.get_running_loop())
        watch = asyncio.create_task(hub.watch_any(["job:a"], 30.0))
        await asyncio.sleep(0)
        hub._jobs_changed({"a": "succeeded"})
        hub._jobs_changed({"a": "running"})  # the commit before it, woken late
        assert await watch == {"job:a": "succeeded"}

    asyncio.run(body())
