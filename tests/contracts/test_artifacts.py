"""The committed artifacts are what the pinned solc makes of the current sources."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contracts import compile as solc
from contracts.compile import ARTIFACTS_DIR, CONTRACT_NAMES, SOURCES_DIR

REPO_ROOT = Path(__file__).parents[2]
CHECK_TIMEOUT_S = 120
HEX_CODE = r"0x(?:[0-9a-f]{2})+"
ARTIFACT_KEYS = {"abi", "bytecode", "compiler", "contractName", "deployedBytecode", "sourceSha256"}

# The interface the web3 bindings are written against: a change here is a breaking change.
EXPECTED_ABI = {
    "PaymentBroker": {
        "constructor(address,uint16,uint64)",
        "function allowance(address,address) view returns (uint256,uint256)",
        "function pendingCap(address,address) view returns (uint256,uint64)",
        "function authorize(address,uint256) nonpayable returns ()",
        "function balanceOf(address) view returns (uint256)",
        "function deposit() payable returns ()",
        "function depositFor(address) payable returns ()",
        "function domainSeparator() view returns (bytes32)",
        "function feeBps() view returns (uint16)",
        "function feeRecipient() view returns (address)",
        "function redeem((address,address,uint256,uint64),bytes) nonpayable returns (uint256)",
        "function redeemBatch((address,address,uint256,uint64)[],bytes[]) nonpayable"
        " returns (uint256)",
        "function redeemed(address,address) view returns (uint256)",
        "function relock() nonpayable returns ()",
        "function unlock() nonpayable returns ()",
        "function unlockAt(address) view returns (uint64)",
        "function voucherDigest((address,address,uint256,uint64)) view returns (bytes32)",
        "function withdraw(uint256) nonpayable returns ()",
        "function withdrawDelay() view returns (uint64)",
        "event Authorized(address indexed payer,address indexed signer,uint256 cap)",
        "event CapLowering(address indexed payer,address indexed signer,uint256 cap,"
        "uint64 effectiveAt)",
        "event Deposited(address indexed payer,uint256 amount)",
        "event Redeemed(address indexed payer,address indexed payee,address indexed signer,"
        "uint256 cumulativeAmount,uint256 paid,uint256 fee)",
        "event Relocked(address indexed payer)",
        "event UnlockRequested(address indexed payer,uint64 unlockAt)",
        "event Withdrawn(address indexed payer,uint256 amount)",
        "error FeeTooHigh(uint16 feeBps)",
        "error InsufficientDeposit(uint256 balance,uint256 needed)",
        "error InvalidSignature()",
        "error LengthMismatch()",
        "error NotIncreasing(uint256 redeemed,uint256 cumulative)",
        "error NotUnlocked()",
        "error OverCap(uint256 cap,uint256 wouldSpend)",
        "error Reentrancy()",
        "error StillLocked(uint64 unlockAt)",
        "error TransferFailed()",
        "error UnauthorizedSigner(address recovered)",
        "error VoucherExpired(uint64 expiry)",
        "error ZeroAmount()",
    },
    "WorkerRegistry": {
        "constructor(uint256,uint64,address)",
        "function arbiter() view returns (address)",
        "function isEligible(address) view returns (bool)",
        "function isSlashed(address) view returns (bool)",
        "function minStake() view returns (uint256)",
        "function slash(address,uint256,bytes32) nonpayable returns ()",
        "function stake() payable returns ()",
        "function stakeOf(address) view returns (uint256)",
        "function unbond(uint256) nonpayable returns ()",
        "function unbondingDelay() view returns (uint64)",
        "function unbondingOf(address) view returns (uint256,uint64)",
        "function withdraw() nonpayable returns ()",
        "event Slashed(address indexed worker,uint256 amount,bytes32 evidenceHash)",
        "event Staked(address indexed worker,uint256 amount,uint256 total)",
        "event UnbondingStarted(address indexed worker,uint256 amount,uint64 readyAt)",
        "event Withdrawn(address indexed worker,uint256 amount)",
        "error InsufficientStake(uint256 have,uint256 want)",
        "error NotArbiter()",
        "error NothingToSlash()",
        "error NothingToWithdraw()",
        "error StillUnbonding(uint64 readyAt)",
        "error TransferFailed()",
        "error EvidenceUsed(bytes32 evidenceHash)",
        "function evidenceUsed(bytes32) view returns (bool)",
        "error ZeroAmount()",
    },
}


def _type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(_type(component) for component in param["components"])
        return f"({inner}){param['type'].removeprefix('tuple')}"
    return str(param["type"])


def _signature(item: dict[str, Any]) -> str:
    types = ",".join(_type(p) for p in item.get("inputs", []))
    if item["type"] == "constructor":
        return f"constructor({types})"
    if item["type"] == "function":
        outputs = ",".join(_type(p) for p in item["outputs"])
        return f"function {item['name']}({types}) {item['stateMutability']} returns ({outputs})"
    # Events and errors: the bindings read their arguments by name.
    named = ",".join(
        f"{_type(p)}{' indexed' if p.get('indexed') else ''} {p['name']}" for p in item["inputs"]
    )
    return f"{item['type']} {item['name']}({named})"


def _artifact(name: str) -> dict[str, Any]:
    return dict(json.loads((ARTIFACTS_DIR / f"{name}.json").read_text()))


def test_check_passes_on_the_committed_artifacts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "contracts.compile", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_check_names_stale_and_missing_artifacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(ARTIFACTS_DIR / "WorkerRegistry.json", tmp_path)
    stale = tmp_path / "WorkerRegistry.json"
    stale.write_text(stale.read_text().replace('"contractName"', '"contractname"'))

    assert solc.main(["--check"], artifacts_dir=tmp_path) == 1

    err = capsys.readouterr().err
    assert f"stale artifact: {stale}" in err
    assert f"stale artifact: {tmp_path / 'PaymentBroker.json'}" in err


def test_check_accepts_an_identical_copy(tmp_path: Path) -> None:
    files = solc.build_artifacts()
    solc.write_artifacts(files, tmp_path)
    assert solc.stale_artifacts(files, tmp_path) == []
    assert solc.stale_artifacts(files, ARTIFACTS_DIR) == []


def test_missing_node_modules_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(solc, "NODE_MODULES", tmp_path / "node_modules")
    with pytest.raises(solc.CompileError, match="run npm install in contracts/"):
        solc.compile_sources({"A.sol": "pragma solidity ^0.8.24; contract A {}"})
    assert solc.main(["--check"]) == 1
    assert "run npm install in contracts/" in capsys.readouterr().err


def test_sources_compile_without_warnings() -> None:
    sources = {f"{name}.sol": (SOURCES_DIR / f"{name}.sol").read_text() for name in CONTRACT_NAMES}
    assert solc.compile_sources(sources).warnings == ()


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_artifact_records_the_pinned_compiler_and_its_source(name: str) -> None:
    artifact = _artifact(name)
    assert set(artifact) == ARTIFACT_KEYS
    assert artifact["contractName"] == name
    assert artifact["compiler"].startswith(solc.pinned_solc_version() + "+commit.")
    source = (SOURCES_DIR / f"{name}.sol").read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest()
    assert re.fullmatch(HEX_CODE, artifact["bytecode"])
    assert re.fullmatch(HEX_CODE, artifact["deployedBytecode"])


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_artifact_text_is_canonical(name: str) -> None:
    text = (ARTIFACTS_DIR / f"{name}.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_abi_is_the_agreed_interface(name: str) -> None:
    assert {_signature(item) for item in _artifact(name)["abi"]} == EXPECTED_ABI[name]
