"""Fine-tune a LLaMA-Adapter with the Lightning Trainer: python finetune/adapter_trainer.py --help."""

from lit_adapter.trainer_cli import main

if __name__ == "__main__":
    main()
