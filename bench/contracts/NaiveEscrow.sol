// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title NaiveEscrow: the baseline for bench/settlement_gas.py, not part of gpumarket.
/// @notice The common "escrow release per job" pattern: a client funds its own escrow, and
/// after each job the client (or the releaser it named, e.g. an orchestrator) sends one
/// transaction that pays the worker for that job directly. A per-job id stops a retried
/// release from paying twice. Kept minimal so the comparison favours the baseline: one
/// client per contract (no per-client balance bookkeeping), no fee, no signatures.
///
/// Amounts are in wei.
contract NaiveEscrow {
    event Funded(uint256 amount);
    event Released(bytes32 indexed jobId, address indexed worker, uint256 amount);

    error NotAuthorized(address caller);
    error AlreadyReleased(bytes32 jobId);
    error TransferFailed();

    address public immutable client;
    address public immutable releaser;

    mapping(bytes32 jobId => bool) public released;

    constructor(address releaser_) {
        client = msg.sender;
        releaser = releaser_;
    }

    /// @notice Add msg.value wei to the escrow.
    function fund() external payable {
        emit Funded(msg.value);
    }

    /// @notice Pay `worker` `amount` wei for job `jobId`, once per job id.
    function release(address payable worker, uint256 amount, bytes32 jobId) external {
        if (msg.sender != client && msg.sender != releaser) revert NotAuthorized(msg.sender);
        if (released[jobId]) revert AlreadyReleased(jobId);
        released[jobId] = true;
        emit Released(jobId, worker, amount);
        (bool ok,) = worker.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }
}
