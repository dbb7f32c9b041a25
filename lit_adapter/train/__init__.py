"""Fine-tuning: the shared recipe and options, the run state on disk, the Fabric loop, and the Trainer route
(LightningModule and LightningCLI) with their precision plugins and strategies."""
