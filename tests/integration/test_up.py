"""`gpumarket up`: the whole local stack from one command, serving until Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

START_TIMEOUT_S = 180.0


def _children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (read from /proc)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and int(entry.name) not in found:
                found.add(int(entry.name))
                frontier.append(int(entry.name))
    return found


def test_up_serves_the_stack_until_ctrl_c_then_stops_every_process(tmp_path: Path) -> None:
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpumarket.cli", "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ctrl-C stops everything" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        text = log_path.read_text()
        dashboard = re.search(r"(http://127\.0\.0\.1:\d+)/#token=(\S+)", text)
        key = re.search(r"GPUMARKET_API_KEY=(\S+)", text)
        assert dashboard and key, text
        url, token = dashboard.group(1), dashboard.group(2)
        assert "orchestrator dashboard" in httpx.get(f"{url}/").text
        workers = httpx.get(
            f"{url}/v1/workers", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert len(workers) == 2
        account = httpx.get(
            f"{url}/v1/account", headers={"Authorization": f"Bearer {key.group(1)}"}
        ).json()
        assert account["payer_address"]  # the printed client can pay at once
        children = _children(proc.pid)
        assert len(children) >= 4  # anvil, the orchestrator, two workers

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        time.sleep(0.5)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        zombies = [p for p in alive if "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]]
        assert set(alive) <= set(zombies), f"still running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
