// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title WorkerRegistry: native-ETH stake that workers bond to receive jobs.
/// @notice Stake leaves only through unbonding: `unbond` moves it aside for `unbondingDelay`
/// seconds, then `withdraw` sends it. The arbiter (the orchestrator's verifier key) can slash
/// a worker with evidence (the hash of the two conflicting signed results); slashing reaches
/// unbonding funds too, so a cheater cannot escape by unbonding, provided the delay is longer
/// than the verification window. Slashed wei go to the arbiter, which redistributes them to
/// the harmed clients off-chain.
///
/// All amounts are in wei; all times are unix seconds (block.timestamp).
contract WorkerRegistry {
    struct Unbonding {
        uint256 amount;
        uint64 readyAt;
    }

    event Staked(address indexed worker, uint256 amount, uint256 total);
    event UnbondingStarted(address indexed worker, uint256 amount, uint64 readyAt);
    event Withdrawn(address indexed worker, uint256 amount);
    event Slashed(address indexed worker, uint256 amount, bytes32 evidenceHash);

    error ZeroAmount();
    error InsufficientStake(uint256 have, uint256 want);
    error NothingToWithdraw();
    error StillUnbonding(uint64 readyAt);
    error NotArbiter();
    error NothingToSlash();
    error TransferFailed();
    error EvidenceUsed(bytes32 evidenceHash);

    /// Active stake (wei) a worker needs to be eligible for jobs.
    uint256 public immutable minStake;
    /// Seconds between `unbond` and the earliest `withdraw` of those funds.
    uint64 public immutable unbondingDelay;
    /// The only address that may slash; receives the slashed wei.
    address public immutable arbiter;

    mapping(address worker => uint256) private _stakes;
    mapping(address worker => Unbonding) private _unbonding;
    mapping(address worker => bool) private _slashed;
    /// Evidence already acted on: a retried slash (the arbiter may send twice) takes once.
    mapping(bytes32 evidenceHash => bool) public evidenceUsed;

    constructor(uint256 minStake_, uint64 unbondingDelay_, address arbiter_) {
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        arbiter = arbiter_;
    }

    /// @notice Add msg.value wei to the sender's active stake.
    function stake() external payable {
        if (msg.value == 0) revert ZeroAmount();
        uint256 total = _stakes[msg.sender] + msg.value;
        _stakes[msg.sender] = total;
        emit Staked(msg.sender, msg.value, total);
    }

    /// @notice Move `amount` wei from active stake to unbonding. Adds to any pending unbonding
    /// and restarts its clock: all of it is ready `unbondingDelay` seconds from now.
    /// The event carries this call's `amount`, not the pending total.
    function unbond(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 have = _stakes[msg.sender];
        if (amount > have) revert InsufficientStake(have, amount);
        _stakes[msg.sender] = have - amount;
        Unbonding storage u = _unbonding[msg.sender];
        uint64 readyAt = uint64(block.timestamp) + unbondingDelay;
        u.amount += amount;
        u.readyAt = readyAt;
        emit UnbondingStarted(msg.sender, amount, readyAt);
    }

    /// @notice Send the sender all its unbonding wei once they are ready.
    function withdraw() external {
        Unbonding memory u = _unbonding[msg.sender];
        if (u.amount == 0) revert NothingToWithdraw();
        if (block.timestamp < u.readyAt) revert StillUnbonding(u.readyAt);
        delete _unbonding[msg.sender];
        emit Withdrawn(msg.sender, u.amount);
        _send(msg.sender, u.amount);
    }

    /// @notice Take up to `amount` wei from `worker` (active stake first, then unbonding) and
    /// send it to the arbiter; the worker is marked slashed for good. The event carries the
    /// amount actually taken, which is `amount` capped at what the worker has.
    function slash(address worker, uint256 amount, bytes32 evidenceHash) external {
        if (msg.sender != arbiter) revert NotArbiter();
        if (amount == 0) revert ZeroAmount();
        uint256 active = _stakes[worker];
        Unbonding storage u = _unbonding[worker];
        uint256 pending = u.amount;
        if (active == 0 && pending == 0) revert NothingToSlash();
        if (evidenceUsed[evidenceHash]) revert EvidenceUsed(evidenceHash);

        uint256 fromActive = amount < active ? amount : active;
        uint256 fromPending = amount - fromActive < pending ? amount - fromActive : pending;
        _stakes[worker] = active - fromActive;
        if (fromPending == pending) {
            delete _unbonding[worker];
        } else {
            u.amount = pending - fromPending;
        }
        _slashed[worker] = true;
        evidenceUsed[evidenceHash] = true;

        uint256 taken = fromActive + fromPending;
        emit Slashed(worker, taken, evidenceHash);
        _send(arbiter, taken);
    }

    /// @notice Active stake of `worker`, in wei (unbonding funds not included).
    function stakeOf(address worker) external view returns (uint256) {
        return _stakes[worker];
    }

    /// @notice Wei `worker` is unbonding and when it can withdraw them (0, 0 when none).
    function unbondingOf(address worker) external view returns (uint256 amount, uint64 readyAt) {
        Unbonding storage u = _unbonding[worker];
        return (u.amount, u.readyAt);
    }

    function isSlashed(address worker) external view returns (bool) {
        return _slashed[worker];
    }

    /// @notice Whether `worker` may receive jobs: enough active stake, nothing unbonding
    /// (an unbonding worker is on its way out) and never slashed.
    function isEligible(address worker) external view returns (bool) {
        return _stakes[worker] >= minStake && _unbonding[worker].amount == 0 && !_slashed[worker];
    }

    function _send(address to, uint256 amount) private {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }
}
