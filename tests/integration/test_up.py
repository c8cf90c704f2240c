"""`gpumarket up`: the whole local stack from one command, serving until Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from contracts.anvil import free_port
from gpumarket.demo import TRY_IT, UP_READY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

START_TIMEOUT_S = 180.0
REPO = Path(__file__).resolve().parents[2]
COMMANDS_TIMEOUT_S = 120.0


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


def _sigterm(proc: subprocess.Popen[bytes], children: set[int]) -> int:
    """SIGTERM ``proc``; its exit code, once every one of ``children`` is gone too."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    zombies = [p for p in alive if "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert set(alive) <= set(zombies), f"still running: {alive}"
    return code


def _printed_commands(text: str) -> list[str]:
    """The commands ``up`` printed to try the stack: the indented lines after TRY_IT."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TRY_IT))
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        commands.append(line.strip())
    return commands


def _environment_of_a_new_shell() -> dict[str, str]:
    """This environment without GPUMARKET_* settings, with the venv's ``gpumarket`` on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMARKET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_up_prints_commands_that_work_then_sigterm_stops_every_process(tmp_path: Path) -> None:
    here = tmp_path / "project"
    here.mkdir()
    port, chain_port = free_port(), free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpumarket.cli", "up", "--port", str(port)]
            + ["--chain-port", str(chain_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=here,
            env={**_environment_of_a_new_shell(), "COLUMNS": "40"},  # narrow: nothing folds
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while UP_READY not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        text = log_path.read_text()
        url = f"http://127.0.0.1:{port}"
        dashboard = re.search(rf"^dashboard\s+{url}/#token=(\S+)$", text, re.M)
        assert dashboard, text
        assert re.search(rf"^chain RPC\s+http://127\.0\.0\.1:{chain_port}$", text, re.M), text
        logs = re.search(r"^logs\s+(\S+)$", text, re.M)
        assert logs and Path(logs.group(1)).is_dir(), text
        deployment = here / ".gpumarket" / "deployment.json"
        assert deployment.is_file()  # where `gpumarket wallet` and the orchestrator look
        assert "orchestrator dashboard" in httpx.get(f"{url}/").text
        workers = httpx.get(
            f"{url}/v1/workers", headers={"Authorization": f"Bearer {dashboard.group(1)}"}
        ).json()
        assert len(workers) == 2

        commands = _printed_commands(text)
        assert commands[0].startswith(f"export GPUMARKET_URL={url} GPUMARKET_API_KEY=gmk_")
        readme = (REPO / "README.md").read_text().splitlines()
        for command in commands[1:]:  # the README shows what this test runs
            assert command in readme, command
        assert any(c.startswith("gpumarket job submit") for c in commands), commands
        ran = subprocess.run(
            ["bash", "-e", "-c", "\n".join(commands)],
            cwd=here,
            env=_environment_of_a_new_shell(),
            capture_output=True,
            text=True,
            timeout=COMMANDS_TIMEOUT_S,
        )
        assert ran.returncode == 0, (commands, ran.stdout, ran.stderr)
        assert re.search(r"^cost wei\s+\d+$", ran.stdout, re.M), ran.stdout  # the job's result
        assert re.search(r"^embeddings\s+1 x 384$", ran.stdout, re.M), ran.stdout
        assert "state: succeeded" in ran.stdout  # job list
        # A paid job's deadline is half the dev payer's withdrawal delay, and submit says so.
        assert "deadline in 1800 s, not the default 3600 s" in ran.stderr, ran.stderr
        assert re.search(r"^broker deposit\s+\d+ wei", ran.stdout, re.M), ran.stdout

        children = _children(proc.pid)
        assert len(children) >= 4  # anvil, the orchestrator, two workers

        assert _sigterm(proc, children) == 0, log_path.read_text()
        assert not Path(logs.group(1)).exists()  # the temporary folder is removed
        assert not deployment.exists()  # it named a chain that is gone
        assert "stopped; every process was shut down" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_port_in_use_with_the_fix(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gpumarket.cli", "up", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=COMMANDS_TIMEOUT_S,
        )
    assert done.returncode == 2, done
    [line] = done.stderr.splitlines()
    assert f"--port {port}: the port is in use" in line


def test_the_demo_stopped_by_sigterm_stops_every_process_it_started(tmp_path: Path) -> None:
    """`make demo` killed with SIGTERM (a CI timeout, `kill`) leaves nothing running: as Ctrl-C."""
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpumarket.demo"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**_environment_of_a_new_shell(), "COLUMNS": "200"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "dashboard http" not in log_path.read_text():  # anvil, orchestrator, workers up
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) >= 4, children  # anvil, the orchestrator, two workers
        temp = re.search(r"gpumarket-demo-\w+", " ".join(_open_paths(children)))

        assert _sigterm(proc, children) == 130, log_path.read_text()
        assert "interrupted; every process was stopped" in log_path.read_text()
        if temp is not None:
            assert not (Path(tempfile.gettempdir()) / temp.group(0)).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _open_paths(pids: set[int]) -> list[str]:
    """The command lines of ``pids`` (the demo's temporary folder is in its children's)."""
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return lines
