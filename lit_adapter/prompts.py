"""The Alpaca instruction template (Taori et al. 2023), shared by data preparation and generation."""

RESPONSE_MARKER = "### Response:\n"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt the model sees for an instruction (and optional input); the response follows it."""
    if input:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n{RESPONSE_MARKER}"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}"
    )
