"""Frozen-base formats: each module stores the frozen blocks' linear weights in another number format and computes
with them; ``lit_adapter.precision`` names each and says what it needs."""
