"""Prompt styles, shared by data preparation, training samples and generation.

``alpaca``: the Alpaca instruction template (Taori et al. 2023), the paper's. ``chat``: the model's own chat
template (from its tokenizer config), rendered by the tokenizer as Hugging Face transformers does. A style is
recorded in ``prep_config.yaml`` and in the adapter file, so generation uses the style that training used.
"""

from typing import TYPE_CHECKING, Literal, Optional, get_args

from lit_adapter.errors import UserError

if TYPE_CHECKING:
    import torch

    from lit_adapter.tokenizer import Tokenizer

PromptStyle = Literal["alpaca", "chat"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)
ROLES = ("system", "user", "assistant")
RESPONSE_MARKER = "### Response:\n"

Message = dict[str, str]


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


def check_prompt_style(style: str) -> PromptStyle:
    """``style`` if it names a prompt style, else a one-line ``UserError``."""
    if style not in PROMPT_STYLES:
        raise UserError(f"unknown prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    return style


def adds_bos(style: Optional[PromptStyle], tokenizer: "Tokenizer") -> bool:
    """Whether a prompt in ``style`` (None: plain text) is encoded after a BOS token: a chat template writes its
    own, else the tokenizer's configuration decides."""
    return style != "chat" and tokenizer.add_bos


def user_message(instruction: str, input: str = "") -> Message:
    """An Alpaca instruction (and optional input) as a chat user turn."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}


def format_prompt(style: Optional[PromptStyle], tokenizer: "Tokenizer", messages: list[Message]) -> str:
    """The text the model continues with its answer to the last user turn of ``messages``.

    ``None`` writes the turns as plain text one after the other (a base model continuing a text). In the alpaca
    style each user turn is an Alpaca instruction and each earlier answer follows its instruction, then a blank
    line; the chat style is the model's own chat template.
    """
    if style is None:
        return "".join(message["content"] for message in messages)
    if check_prompt_style(style) == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if any(message["role"] == "system" for message in messages):
        raise UserError("the alpaca prompt style has no system prompt: use --prompt_style chat")
    return "".join(alpaca_prompt(message["content"]) if message["role"] == "user" else message["content"] + "\n\n"
                   for message in messages)


def encode_prompt(style: Optional[PromptStyle], tokenizer: "Tokenizer", messages: list[Message]) -> "torch.Tensor":
    """The token ids of ``format_prompt``, led by BOS where ``adds_bos`` says so."""
    return tokenizer.encode(format_prompt(style, tokenizer, messages), bos=adds_bos(style, tokenizer))


def record_messages(record: dict) -> list[Message]:
    """The conversation of a training record: its ``messages``, or an Alpaca record as one user and one assistant turn."""
    if "messages" in record:
        return record["messages"]
    return [user_message(record["instruction"], record.get("input", "")),
            {"role": "assistant", "content": record["output"]}]


def sample_segments(style: PromptStyle, tokenizer: "Tokenizer", record: dict) -> list[tuple[str, bool]]:
    """A training record as consecutive pieces of text, each with whether training learns it (assistant answers).

    Joined, the pieces are the whole sample in ``style``; every learned piece is an assistant turn as the model
    writes it after the prompt that ``format_prompt`` gives for the turns before it. In the alpaca style the answer
    is learned without an end marker (the caller appends EOS); a chat template closes each answer itself.
    """
    if check_prompt_style(style) == "alpaca":
        if "messages" not in record:
            return [(alpaca_prompt(record["instruction"], record.get("input", "")), False), (record["output"], True)]
        roles = [message["role"] for message in record["messages"]]
        if roles != ["user", "assistant"]:
            raise UserError(f"the alpaca prompt style holds one instruction and its answer, not a conversation of "
                            f"{roles}: prepare with --prompt_style chat (the model's chat template)")
        question, answer = record["messages"]
        return [(alpaca_prompt(question["content"]), False), (answer["content"], True)]
    return chat_segments(tokenizer, record_messages(record))


def chat_segments(tokenizer: "Tokenizer", messages: list[Message]) -> list[tuple[str, bool]]:
    """``sample_segments`` in the chat style: the chat template rendered turn by turn."""
    segments, rendered = [], ""

    def extend(text: str, learned: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise UserError("the chat template does not render conversations turn by turn (a later turn changes the "
                            "text before it), so answers cannot be told apart from prompts")
        if len(text) > len(rendered):
            segments.append((text[len(rendered):], learned))
        rendered = text

    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True), False)
        extend(tokenizer.apply_chat_template(messages[:turn + 1], add_generation_prompt=False),
               message["role"] == "assistant")
    return segments
