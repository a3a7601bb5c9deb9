// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @title Silent: the tracked contract that never emits an event.
/// @notice Only a block scan or a trace can find its transactions.
contract Silent {
    uint256 public stored;
    uint256 public count;

    function store(uint256 x) external payable {
        stored = x;
        count += 1;
    }

    function fail() external {
        count += 1; // keeps the function state-changing in the ABI
        require(false, "nope");
    }
}
