"""Placement plans, block streaming and the memory ledger."""
