"""Compile contracts/src/*.sol with the pinned solc and write contracts/artifacts/*.json.

    python -m contracts.compile            # (re)write the artifacts
    python -m contracts.compile --check    # exit 1, naming each stale artifact, if they differ

The compiler is the npm package ``solc`` pinned in contracts/package.json (``npm install`` in
contracts/ installs it), driven through Node with standard-JSON input, so every machine builds
byte-identical artifacts. The artifacts are committed; a test runs ``--check``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.abi import ARTIFACTS_DIR
from contracts.anvil import CONTRACTS_DIR, NODE_MODULES

SOURCES_DIR = CONTRACTS_DIR / "src"
PACKAGE_JSON = CONTRACTS_DIR / "package.json"
CONTRACT_NAMES = ("PaymentBroker", "WorkerRegistry")
OPTIMIZER_RUNS = 200
COMPILE_TIMEOUT_S = 120.0

# Reads standard-JSON input on stdin and writes {"version", "output"} on stdout. The solc
# module's path comes in as an argument so resolution does not depend on the working directory.
_NODE_DRIVER = """
const solc = require(process.argv[1]);
const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  const output = solc.compile(Buffer.concat(chunks).toString("utf8"));
  process.stdout.write(JSON.stringify({ version: solc.version(), output: JSON.parse(output) }));
});
"""


class CompileError(RuntimeError):
    """The compiler is missing or mis-pinned, or the sources do not compile."""


@dataclass(frozen=True)
class Compilation:
    """solc's standard-JSON output, the compiler's full version, and its warnings."""

    output: dict[str, Any]
    solc_version: str
    warnings: tuple[str, ...]

    def contract(self, source_name: str, contract_name: str) -> dict[str, Any]:
        return dict(self.output["contracts"][source_name][contract_name])


def pinned_solc_version() -> str:
    """The solc version contracts/package.json pins, e.g. ``0.8.37``."""
    package = json.loads(PACKAGE_JSON.read_text())
    return str(package["devDependencies"]["solc"])


def _solc_module() -> Path:
    module = NODE_MODULES / "solc"
    if not (module / "package.json").is_file():
        raise CompileError(
            f"solc is not installed in {NODE_MODULES}: run npm install in contracts/"
        )
    installed = json.loads((module / "package.json").read_text())["version"]
    pinned = pinned_solc_version()
    if installed != pinned:
        raise CompileError(
            f"installed solc {installed} differs from the pin {pinned} in {PACKAGE_JSON}: "
            "run npm install in contracts/"
        )
    return module


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise CompileError("node is not on PATH: install Node.js 20 or newer")
    return node


def standard_input(sources: Mapping[str, str]) -> dict[str, Any]:
    """solc standard-JSON input for ``{source unit name: Solidity text}``."""
    return {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": {
            "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
            "outputSelection": {
                "*": {
                    "*": [
                        "abi",
                        "evm.bytecode.object",
                        "evm.deployedBytecode.object",
                        "metadata",
                    ]
                }
            },
        },
    }


def compile_sources(sources: Mapping[str, str]) -> Compilation:
    """Compile ``{source unit name: Solidity text}`` with the pinned solc.

    Raises CompileError with solc's messages if any source has an error.
    """
    module = _solc_module()
    try:
        proc = subprocess.run(
            [_node(), "-e", _NODE_DRIVER, str(module.resolve())],
            input=json.dumps(standard_input(sources)).encode(),
            capture_output=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"solc did not finish within {COMPILE_TIMEOUT_S:.0f}s") from exc
    if proc.returncode != 0:
        raise CompileError(f"node exited {proc.returncode}: {proc.stderr.decode().strip()}")
    reply = json.loads(proc.stdout)
    output: dict[str, Any] = reply["output"]
    diagnostics = output.get("errors", [])
    errors = [d["formattedMessage"] for d in diagnostics if d["severity"] == "error"]
    if errors:
        raise CompileError("solc failed:\n" + "\n".join(errors))
    warnings = tuple(d["formattedMessage"] for d in diagnostics if d["severity"] != "error")
    return Compilation(output=output, solc_version=str(reply["version"]), warnings=warnings)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_artifacts(contract_names: Sequence[str] = CONTRACT_NAMES) -> dict[str, str]:
    """Compile ``src/<Name>.sol`` for each name; ``{artifact file name: file text}``.

    Each source defines the contract of its own name. The text is deterministic (sorted keys,
    two-space indent, trailing newline), so recompiling unchanged sources gives the same bytes.
    """
    raw = {name: (SOURCES_DIR / f"{name}.sol").read_bytes() for name in contract_names}
    compilation = compile_sources({f"{name}.sol": text.decode() for name, text in raw.items()})
    for warning in compilation.warnings:
        print(warning, file=sys.stderr)
    files = {}
    for name in contract_names:
        contract = compilation.contract(f"{name}.sol", name)
        # metadata names the compiler without the platform suffix (".Emscripten.clang").
        compiler = json.loads(contract["metadata"])["compiler"]["version"]
        artifact = {
            "contractName": name,
            "abi": contract["abi"],
            "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
            "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
            "compiler": compiler,
            "sourceSha256": _sha256_hex(raw[name]),
        }
        files[f"{name}.json"] = json.dumps(artifact, indent=2, sort_keys=True) + "\n"
    return files


def stale_artifacts(files: Mapping[str, str], artifacts_dir: Path = ARTIFACTS_DIR) -> list[str]:
    """Artifact files in ``artifacts_dir`` that are missing or differ from ``files``."""
    stale = []
    for file_name, text in sorted(files.items()):
        path = artifacts_dir / file_name
        if not path.is_file() or path.read_bytes() != text.encode():
            stale.append(file_name)
    return stale


def write_artifacts(files: Mapping[str, str], artifacts_dir: Path = ARTIFACTS_DIR) -> None:
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    for file_name, text in sorted(files.items()):
        (artifacts_dir / file_name).write_bytes(text.encode())


def main(argv: Sequence[str] | None = None, artifacts_dir: Path = ARTIFACTS_DIR) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contracts.compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compile in memory and exit 1 if the committed artifacts differ",
    )
    args = parser.parse_args(argv)
    try:
        files = build_artifacts()
    except CompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        stale = stale_artifacts(files, artifacts_dir)
        for file_name in stale:
            print(
                f"stale artifact: {artifacts_dir / file_name} does not match its source "
                "(run python -m contracts.compile and commit the result)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    write_artifacts(files, artifacts_dir)
    for file_name in sorted(files):
        print(f"wrote {artifacts_dir / file_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
