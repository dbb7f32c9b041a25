"""The OpenAI-compatible server: many adapters on one base, answered by the batch engine."""
