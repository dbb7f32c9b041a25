"""Training data: records, prepared sets, step plans and batching, and the LightningDataModule."""
