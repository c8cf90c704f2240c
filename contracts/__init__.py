"""Solidity contracts (src/), their compiled artifacts (artifacts/, committed), and the web3
bindings: the anvil dev chain, deployment, PaymentBroker and WorkerRegistry clients."""
