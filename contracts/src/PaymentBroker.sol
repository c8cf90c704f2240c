// SPDX-License-Identifier: Apache-2.0
// ^0.8.28: the reentrancy flag is a transient state variable.
pragma solidity ^0.8.28;

/// @title PaymentBroker: prepaid deposits paid out through cumulative EIP-712 vouchers.
/// @notice A payer (the client) deposits native ETH and authorises a signer (the orchestrator)
/// to spend up to a cap. After each paid job the signer signs, for that worker, "payer P owes
/// payee W a cumulative total of X wei". Anyone may redeem the latest voucher; the contract pays
/// the delta since the last redemption of that (payer, payee) pair, minus the broker fee.
/// Replays and lower cumulatives revert, so redemption is idempotent.
///
/// Withdrawal needs `unlock` and then `withdrawDelay` seconds, so that payees can redeem their
/// outstanding vouchers first: a payee should redeem as soon as it sees `UnlockRequested`.
/// Each withdrawal consumes the unlock; the next one needs a fresh `unlock` and delay, so
/// `unlockAt(payer) == 0` always means the deposit cannot leave within `withdrawDelay`.
///
/// All amounts are in wei; all times are unix seconds (block.timestamp).
contract PaymentBroker {
    struct Voucher {
        address payer;
        address payee;
        uint256 cumulativeAmount;
        uint64 expiry;
    }

    struct Allowance {
        uint256 cap;
        uint256 spent;
        // A lower cap waits out withdrawDelay, like the deposit: vouchers signed under the
        // old cap stay redeemable until then, so revoking cannot void work already done.
        uint256 pendingCap;
        uint64 pendingAt;
    }

    event Deposited(address indexed payer, uint256 amount);
    event Authorized(address indexed payer, address indexed signer, uint256 cap);
    event CapLowering(
        address indexed payer, address indexed signer, uint256 cap, uint64 effectiveAt
    );
    event UnlockRequested(address indexed payer, uint64 unlockAt);
    event Relocked(address indexed payer);
    event Withdrawn(address indexed payer, uint256 amount);
    event Redeemed(
        address indexed payer,
        address indexed payee,
        address indexed signer,
        uint256 cumulativeAmount,
        uint256 paid,
        uint256 fee
    );

    error ZeroAmount();
    error FeeTooHigh(uint16 feeBps);
    error UnauthorizedSigner(address recovered);
    error VoucherExpired(uint64 expiry);
    error NotIncreasing(uint256 redeemed, uint256 cumulative);
    error OverCap(uint256 cap, uint256 wouldSpend);
    error InsufficientDeposit(uint256 balance, uint256 needed);
    error NotUnlocked();
    error StillLocked(uint64 unlockAt);
    error LengthMismatch();
    error TransferFailed();
    error InvalidSignature();
    error Reentrancy();

    uint256 private constant MAX_BPS = 10_000;
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("gpumarket PaymentBroker");
    bytes32 private constant VERSION_HASH = keccak256("1");
    bytes32 private constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address payer,address payee,uint256 cumulativeAmount,uint64 expiry)");
    /// secp256k1 order / 2. A signature with a larger s is the malleable twin of a valid one.
    uint256 private constant HALF_CURVE_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    /// Receives `feeBps` / 10000 of every redeemed delta.
    address public immutable feeRecipient;
    /// Broker fee in basis points of each redeemed delta (at most 10000).
    uint16 public immutable feeBps;
    /// Seconds between `unlock` and the earliest `withdraw`.
    uint64 public immutable withdrawDelay;

    bytes32 private immutable _cachedDomainSeparator;
    uint256 private immutable _cachedChainId;

    mapping(address payer => uint256) private _balances;
    mapping(address payer => mapping(address signer => Allowance)) private _allowances;
    mapping(address payer => mapping(address payee => uint256)) private _redeemed;
    mapping(address payer => uint64) private _unlockAt;
    /// Reentrancy flag in transient storage (EIP-1153): ~100 gas instead of a storage write.
    bool private transient _entered;

    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    constructor(address feeRecipient_, uint16 feeBps_, uint64 withdrawDelay_) {
        if (feeBps_ > MAX_BPS) revert FeeTooHigh(feeBps_);
        feeRecipient = feeRecipient_;
        feeBps = feeBps_;
        withdrawDelay = withdrawDelay_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    // ---- deposits ------------------------------------------------------------------------

    /// @notice Credit msg.value wei to the sender's deposit.
    function deposit() external payable {
        _credit(msg.sender);
    }

    /// @notice Credit msg.value wei to `payer`'s deposit (anyone may top up anyone).
    function depositFor(address payer) external payable {
        _credit(payer);
    }

    /// @notice Let `signer` sign vouchers that spend, in total over all payees, up to `cap` wei
    /// of the sender's deposit. Replaces the cap and keeps what was already spent, so a cap at
    /// or below `spent` stops further spending and `cap = 0` revokes the signer.
    function authorize(address signer, uint256 cap) external {
        Allowance storage a = _allowances[msg.sender][signer];
        uint256 current = _effectiveCap(a);
        if (cap >= current) {
            a.cap = cap;
            a.pendingCap = 0;
            a.pendingAt = 0;
            emit Authorized(msg.sender, signer, cap);
            return;
        }
        a.cap = current;
        a.pendingCap = cap;
        a.pendingAt = uint64(block.timestamp) + withdrawDelay;
        emit CapLowering(msg.sender, signer, cap, a.pendingAt);
    }

    // ---- withdrawal ----------------------------------------------------------------------

    /// @notice Start (or restart) the withdrawal clock: `withdraw` works from
    /// block.timestamp + withdrawDelay on. Vouchers stay redeemable meanwhile.
    function unlock() external {
        uint64 readyAt = uint64(block.timestamp) + withdrawDelay;
        _unlockAt[msg.sender] = readyAt;
        emit UnlockRequested(msg.sender, readyAt);
    }

    /// @notice Cancel a pending unlock.
    function relock() external {
        if (_unlockAt[msg.sender] == 0) revert NotUnlocked();
        delete _unlockAt[msg.sender];
        emit Relocked(msg.sender);
    }

    /// @notice Send `amount` wei of the sender's deposit back to the sender, once the unlock
    /// delay has passed. Consumes the unlock: a later withdrawal needs a new `unlock`.
    function withdraw(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        uint64 readyAt = _unlockAt[msg.sender];
        if (readyAt == 0) revert NotUnlocked();
        if (block.timestamp < readyAt) revert StillLocked(readyAt);
        uint256 balance = _balances[msg.sender];
        if (amount > balance) revert InsufficientDeposit(balance, amount);
        _balances[msg.sender] = balance - amount;
        delete _unlockAt[msg.sender];
        emit Withdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    // ---- redemption ----------------------------------------------------------------------

    /// @notice Pay `v.payee` the delta between `v.cumulativeAmount` and what this (payer, payee)
    /// pair already redeemed, minus the fee. Anyone may submit. Returns the wei paid to the payee.
    function redeem(Voucher calldata v, bytes calldata signature)
        external
        nonReentrant
        returns (uint256 paid)
    {
        uint256 fee;
        (paid, fee) = _redeem(v, signature);
        _send(feeRecipient, fee);
    }

    /// @notice Redeem many vouchers in one transaction; any failing voucher reverts the whole
    /// batch with its own error. The fees go to `feeRecipient` in one transfer.
    /// Returns the wei paid to all payees together.
    function redeemBatch(Voucher[] calldata vouchers, bytes[] calldata signatures)
        external
        nonReentrant
        returns (uint256 totalPaid)
    {
        if (vouchers.length != signatures.length) revert LengthMismatch();
        uint256 totalFee;
        for (uint256 i; i < vouchers.length; ++i) {
            (uint256 paid, uint256 fee) = _redeem(vouchers[i], signatures[i]);
            totalPaid += paid;
            totalFee += fee;
        }
        _send(feeRecipient, totalFee);
    }

    // ---- views ---------------------------------------------------------------------------

    function balanceOf(address payer) external view returns (uint256) {
        return _balances[payer];
    }

    function allowance(address payer, address signer)
        external
        view
        returns (uint256 cap, uint256 spent)
    {
        Allowance storage a = _allowances[payer][signer];
        return (_effectiveCap(a), a.spent);
    }

    /// @notice A lowered cap not in force yet (0, 0 when none): what new work can rely on.
    function pendingCap(address payer, address signer)
        external
        view
        returns (uint256 cap, uint64 effectiveAt)
    {
        Allowance storage a = _allowances[payer][signer];
        if (a.pendingAt == 0 || block.timestamp >= a.pendingAt) return (0, 0);
        return (a.pendingCap, a.pendingAt);
    }

    function _effectiveCap(Allowance storage a) private view returns (uint256) {
        if (a.pendingAt != 0 && block.timestamp >= a.pendingAt) return a.pendingCap;
        return a.cap;
    }

    /// @notice The cumulative amount already redeemed for (payer, payee), in wei.
    function redeemed(address payer, address payee) external view returns (uint256) {
        return _redeemed[payer][payee];
    }

    /// @notice When `payer` may withdraw (unix seconds); 0 when no unlock is pending.
    function unlockAt(address payer) external view returns (uint64) {
        return _unlockAt[payer];
    }

    function domainSeparator() public view returns (bytes32) {
        // Recomputed after a chain split, so a voucher for one fork is not valid on the other.
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The EIP-712 digest the signer signs for `v`.
    function voucherDigest(Voucher calldata v) public view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(VOUCHER_TYPEHASH, v.payer, v.payee, v.cumulativeAmount, v.expiry)
        );
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    // ---- internals -----------------------------------------------------------------------

    function _credit(address payer) private {
        if (msg.value == 0) revert ZeroAmount();
        _balances[payer] += msg.value;
        emit Deposited(payer, msg.value);
    }

    /// Checks and effects of one voucher, then the payee's transfer; the caller sends the fee.
    function _redeem(Voucher calldata v, bytes calldata signature)
        private
        returns (uint256 paid, uint256 fee)
    {
        address signer = _recover(voucherDigest(v), signature);
        Allowance storage a = _allowances[v.payer][signer];
        uint256 cap = _effectiveCap(a);
        if (cap == 0) revert UnauthorizedSigner(signer);
        if (block.timestamp > v.expiry) revert VoucherExpired(v.expiry);

        uint256 already = _redeemed[v.payer][v.payee];
        if (v.cumulativeAmount <= already) revert NotIncreasing(already, v.cumulativeAmount);
        uint256 delta = v.cumulativeAmount - already;
        uint256 wouldSpend = a.spent + delta;
        if (wouldSpend > cap) revert OverCap(cap, wouldSpend);
        uint256 balance = _balances[v.payer];
        if (balance < delta) revert InsufficientDeposit(balance, delta);

        _redeemed[v.payer][v.payee] = v.cumulativeAmount;
        a.spent = wouldSpend;
        _balances[v.payer] = balance - delta;
        fee = (delta * feeBps) / MAX_BPS;
        paid = delta - fee;

        emit Redeemed(v.payer, v.payee, signer, v.cumulativeAmount, paid, fee);
        _send(v.payee, paid);
    }

    /// The signer of `digest`; rejects anything but a 65-byte (r, s, v) signature with low s
    /// and v in {27, 28}, so each voucher has exactly one valid signature.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) revert InvalidSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_CURVE_ORDER || (v != 27 && v != 28)) revert InvalidSignature();
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
        return signer;
    }

    function _send(address to, uint256 amount) private {
        if (amount == 0) return;
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this))
        );
    }
}
