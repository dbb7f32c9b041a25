"""Frozen-base formats: each module stores the frozen blocks' linear weights in another number format and computes
with them; ``lit_adapter.precision`` names each and says what it needs.

A format's ``quantize(block)`` changes one transformer block in place and returns how many linear layers it stored
anew; ``checkpoint.load_model`` calls it for each block as soon as that block is loaded.
"""

import torch.nn as nn


def frozen_linears(block: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every bias-free ``nn.Linear`` of a block (all its frozen base weights: attention and MLP) as (parent, name,
    layer). The norms and the adapter's prompts and gates are no linear layers and stay as they are."""
    return [(parent, name, child) for parent in block.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.bias is None]
