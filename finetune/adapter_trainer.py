"""Fine-tune (fit) or validate a LLaMA-Adapter with the Lightning Trainer: python finetune/adapter_trainer.py fit
--help, or validate --help; arguments that do not start with a subcommand are fit's."""

from lit_adapter.train.lightning_cli import main

if __name__ == "__main__":
    main()
