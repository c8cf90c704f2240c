"""The development chain: anvil from the npm package ``@foundry-rs/anvil`` (see package.json).

npm 11 skips the package's postinstall script, so the binary is run from the platform
package directly; ``npm install`` in contracts/ installs it.
"""

from __future__ import annotations

import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import httpx

CONTRACTS_DIR = Path(__file__).parent
NODE_MODULES = CONTRACTS_DIR / "node_modules"
ANVIL_READY_TIMEOUT_S = 30.0
ANVIL_STOP_TIMEOUT_S = 10.0
RPC_PROBE_TIMEOUT_S = 1.0
DEV_CHAIN_ID = 31337
# anvil's well-known mnemonic accounts: for the local dev chain only, never for real money.
DEV_PRIVATE_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)

DEV_FUND_FROM = 0
"""``gpumarket chain fund`` pays from this dev account (anvil gives each 10,000 ETH)."""


def fund_command(address: str, rpc_url: str) -> str:
    """The command that funds ``address`` on the dev chain at ``rpc_url``, as error messages
    print it (runnable as written)."""
    return f"gpumarket chain fund {address} --rpc-url {rpc_url}"


class AnvilNotInstalled(RuntimeError):
    pass


def anvil_binary() -> Path:
    """The anvil executable from contracts/node_modules (or PATH as a fallback)."""
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = platform.system().lower()
    candidate = NODE_MODULES / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / "anvil"
    if candidate.is_file():
        return candidate
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise AnvilNotInstalled(f"anvil not found; run `npm install` in {CONTRACTS_DIR}")


NPM_CI_TIMEOUT_S = 600.0


def ensure_installed() -> Path:
    """anvil's path, running ``npm install`` in contracts/ first when it is not installed yet."""
    try:
        return anvil_binary()
    except AnvilNotInstalled:
        npm = shutil.which("npm")
        if npm is None:
            raise AnvilNotInstalled(
                "anvil is not installed and npm is not on PATH: install Node.js 20 and npm"
            ) from None
        subprocess.run(
            # install, not ci: see the Makefile (npm 11 and anvil's platform packages)
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CONTRACTS_DIR,
            check=True,
            timeout=NPM_CI_TIMEOUT_S,
        )
        return anvil_binary()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc_ready(url: str) -> bool:
    try:
        response = httpx.post(
            url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            timeout=RPC_PROBE_TIMEOUT_S,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "result" in response.json()


class Anvil:
    """An anvil process on loopback. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        port: int | None = None,
        *,
        block_time_s: float | None = None,
        state_file: Path | None = None,
        state_interval_s: int | None = None,
        log: IO[bytes] | None = None,
    ) -> None:
        if state_interval_s is not None and (state_file is None or state_interval_s < 1):
            raise ValueError("state_interval_s needs a state_file and must be >= 1 second")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.block_time_s = block_time_s
        self.state_file = state_file
        self.state_interval_s = state_interval_s
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--chain-id", str(DEV_CHAIN_ID), "--silent"]
        if self.block_time_s:
            cmd += ["--block-time", str(self.block_time_s)]
        if self.state_file is not None:
            # --state loads the chain at start and dumps it on exit: a restart keeps balances.
            cmd += ["--state", str(self.state_file)]
        if self.state_interval_s is not None:
            # ... and also every this many seconds, so a SIGKILL loses at most that much.
            cmd += ["--state-interval", str(self.state_interval_s)]
        return cmd

    def start(self) -> Anvil:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log or subprocess.DEVNULL,
            stderr=self._log or subprocess.DEVNULL,
        )
        deadline = time.monotonic() + ANVIL_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"anvil exited at start with code {self.proc.returncode}")
            if rpc_ready(self.url):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"anvil did not answer on {self.url} within {ANVIL_READY_TIMEOUT_S}s")

    def stop(self) -> None:
        """SIGTERM (anvil dumps --state then), SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=ANVIL_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=ANVIL_STOP_TIMEOUT_S)

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
