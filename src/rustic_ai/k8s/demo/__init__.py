"""Agents for the local-cluster demo; shipped in the package so any host can import them."""
