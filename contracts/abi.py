"""Compiled artifacts (contracts/artifacts/*.json) and decoding of revert data.

An artifact is what ``python -m contracts.compile`` writes: ``contractName``, ``abi``,
``bytecode``, ``deployedBytecode``, ``compiler``, ``sourceSha256``. ``ErrorTable`` maps the
4-byte selectors of a contract's custom errors (plus Solidity's built-in ``Error(string)`` and
``Panic(uint256)``) to their names and argument types, so a revert reads as
``OverCap(cap=..., wouldSpend=...)`` instead of hex.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address
from eth_utils.abi import collapse_if_tuple

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
PAYMENT_BROKER = "PaymentBroker"
WORKER_REGISTRY = "WorkerRegistry"
SELECTOR_BYTES = 4
# Solidity's built-in reverts: require(cond, "reason") and assert/overflow/division by zero.
BUILTIN_ERRORS: tuple[Mapping[str, Any], ...] = (
    {"type": "error", "name": "Error", "inputs": [{"name": "reason", "type": "string"}]},
    {"type": "error", "name": "Panic", "inputs": [{"name": "code", "type": "uint256"}]},
)


class ArtifactMissing(FileNotFoundError):
    """An artifact file is absent; ``python -m contracts.compile`` writes them."""


@dataclass(frozen=True)
class Artifact:
    """One compiled contract. Bytecode is 0x-hex."""

    contract_name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    compiler: str
    source_sha256: str

    @cached_property
    def errors(self) -> ErrorTable:
        return ErrorTable.from_abi(self.abi)


def _hex(value: str) -> str:
    return value if value.startswith("0x") else "0x" + value


def load_artifact(name: str, directory: Path = ARTIFACTS_DIR) -> Artifact:
    """Read ``<directory>/<name>.json``; ArtifactMissing if it is not there."""
    return _load_artifact_cached(name, directory.resolve())


@lru_cache(maxsize=16)
def _load_artifact_cached(name: str, directory: Path) -> Artifact:
    path = directory / f"{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactMissing(
            f"{path} is missing; run `python -m contracts.compile` to produce it"
        ) from exc
    try:
        return Artifact(
            contract_name=str(raw["contractName"]),
            abi=list(raw["abi"]),
            bytecode=_hex(str(raw["bytecode"])),
            deployed_bytecode=_hex(str(raw["deployedBytecode"])),
            compiler=str(raw["compiler"]),
            source_sha256=str(raw["sourceSha256"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a contract artifact (missing {exc})") from exc


def selector(signature: str) -> bytes:
    """The 4-byte selector of a canonical signature such as ``OverCap(uint256,uint256)``."""
    return bytes(keccak(text=signature))[:SELECTOR_BYTES]


@dataclass(frozen=True)
class ErrorSpec:
    name: str
    input_names: tuple[str, ...]
    input_types: tuple[str, ...]

    @property
    def signature(self) -> str:
        return f"{self.name}({','.join(self.input_types)})"

    @property
    def selector(self) -> bytes:
        return selector(self.signature)


@dataclass(frozen=True)
class DecodedError:
    """A revert read through an ABI: the error's name and its arguments in ABI order.

    Addresses come back checksummed, ``bytesN`` as bytes, integers as int.
    """

    name: str
    values: tuple[Any, ...]
    named: Mapping[str, Any] = field(default_factory=dict)


def _normalize(abi_type: str, value: Any) -> Any:
    if abi_type == "address":
        return to_checksum_address(value)
    if abi_type.endswith("]") and isinstance(value, list | tuple):
        element_type = abi_type[: abi_type.rindex("[")]
        return tuple(_normalize(element_type, item) for item in value)
    return value


@dataclass(frozen=True)
class ErrorTable:
    """Selector -> error spec for one ABI (or several merged); built-ins always included."""

    by_selector: Mapping[bytes, ErrorSpec]

    @classmethod
    def from_abi(cls, *abis: Iterable[Mapping[str, Any]]) -> ErrorTable:
        specs: dict[bytes, ErrorSpec] = {}
        for entry in (*BUILTIN_ERRORS, *(item for abi in abis for item in abi)):
            if entry.get("type") != "error":
                continue
            inputs: Sequence[Mapping[str, Any]] = entry.get("inputs", [])
            spec = ErrorSpec(
                name=str(entry["name"]),
                input_names=tuple(str(item.get("name", "")) for item in inputs),
                input_types=tuple(collapse_if_tuple(dict(item)) for item in inputs),
            )
            specs[spec.selector] = spec
        return cls(by_selector=specs)

    def merged(self, other: ErrorTable) -> ErrorTable:
        return ErrorTable(by_selector={**self.by_selector, **other.by_selector})

    def decode(self, data: bytes) -> DecodedError | None:
        """The error that ``data`` (revert return data) encodes; None if unknown or malformed."""
        spec = self.by_selector.get(bytes(data[:SELECTOR_BYTES]))
        if spec is None:
            return None
        try:
            raw_values = abi_decode(list(spec.input_types), bytes(data[SELECTOR_BYTES:]))
        except (DecodingError, ValueError, OverflowError):
            return None
        values = tuple(
            _normalize(abi_type, value)
            for abi_type, value in zip(spec.input_types, raw_values, strict=True)
        )
        named = {name: value for name, value in zip(spec.input_names, values, strict=True) if name}
        return DecodedError(name=spec.name, values=values, named=named)
