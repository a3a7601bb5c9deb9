// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

interface IPing {
    function ping(bytes calldata data) external payable;
}

interface IStore {
    function store(uint256 x) external payable;
}

/// @title Router: reaches Token and Silent through internal calls.
/// @notice A trace sees the inner calls; a block scan only sees a transaction to the router.
contract Router {
    function route(address token, address silent, bytes calldata data, uint256 x)
        external
        payable
    {
        IPing(token).ping{value: msg.value}(data);
        IStore(silent).store(x);
    }
}
