"""Prompt styles: how a training record or a conversation becomes the text a model reads, for data preparation,
training samples and generation alike.

A style is a class registered in ``STYLES`` under its ``name``: ``plain`` (the text as it is, for a base model
continuing it), ``alpaca`` (the Alpaca instruction template of Taori et al. 2023, the paper's) and ``chat`` (the
model's own chat template from its tokenizer config, rendered as Hugging Face transformers does). The name is
recorded in ``prep_config.yaml`` and in the adapter file, so generation writes prompts as training did; files from
before styles were recorded mean ``LEGACY_STYLE``. A new style is one class and one entry.
"""

import re
from typing import TYPE_CHECKING, Literal, Optional

from lit_adapter.errors import UserError

if TYPE_CHECKING:
    import torch

    from lit_adapter.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
Segments = list[tuple[str, bool]]
"""Consecutive pieces of a training sample's text, each with whether training learns it."""


class PromptStyle:
    """How conversations become text: ``prompt`` for generation, ``segments`` for training samples."""

    name: str

    def render(self, tokenizer: "Tokenizer", messages: list[Message], add_generation_prompt: bool) -> str:
        """The text of ``messages``, followed where asked by what opens the assistant's answer."""
        raise NotImplementedError

    def prompt(self, tokenizer: "Tokenizer", messages: list[Message]) -> str:
        """The text the model continues with its answer to the last user turn of ``messages``, rendered from the
        messages ``escape``-d (``Tokenizer.encode_rendered`` encodes it)."""
        return self.render(tokenizer, escaped(tokenizer, messages), add_generation_prompt=True)

    def segments(self, tokenizer: "Tokenizer", record: dict) -> Segments:
        """A training record (Alpaca fields or ``messages``) as pieces of rendered text (as ``prompt``), each answer
        learned with the end-of-turn token the style writes after it. Joined, they are the whole sample; the last
        answer follows the ``prompt`` of the turns before it. The caller closes a sample whose answers carry no
        end-of-turn token (``split_closing``) with EOS."""
        return conversation_segments(self, tokenizer, escaped(tokenizer, record_messages(record)))

    def adds_bos(self, tokenizer: "Tokenizer") -> bool:
        """Whether a prompt in this style is encoded after a BOS token (the tokenizer's configuration decides)."""
        return tokenizer.add_bos

    def encode(self, tokenizer: "Tokenizer", messages: list[Message]) -> "torch.Tensor":
        """The token ids of ``prompt``, led by BOS where ``adds_bos`` says so."""
        return tokenizer.encode_rendered(self.prompt(tokenizer, messages), bos=self.adds_bos(tokenizer))

    def split_closing(self, ids: list[int], learned: list[bool],
                      tokenizer: "Tokenizer") -> tuple[list[int], list[bool], list[int]]:
        """A sample's tokens and the tokens that close it: EOS after the last answer."""
        return ids, learned, [tokenizer.eos_id]


class Plain(PromptStyle):
    """The turns' texts one after the other: a base model continues the text."""

    name = "plain"

    def render(self, tokenizer: "Tokenizer", messages: list[Message], add_generation_prompt: bool) -> str:
        return "".join(message["content"] for message in messages)


class Alpaca(PromptStyle):
    """The Alpaca instruction template: each user turn an instruction, each answer after its "### Response:"."""

    name = "alpaca"
    response_marker = "### Response:\n"

    def render(self, tokenizer: "Tokenizer", messages: list[Message], add_generation_prompt: bool) -> str:
        if any(message["role"] == "system" for message in messages):
            raise UserError("the alpaca prompt style has no system prompt: use --prompt_style chat")
        return "".join(self.instruction(message["content"]) if message["role"] == "user" else
                       message["content"] + "\n\n" for message in messages)

    def instruction(self, instruction: str, input: str = "") -> str:
        """The prompt of an instruction (and optional input); the response follows it."""
        if input:
            return ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n"
                    f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n{self.response_marker}")
        return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{instruction}\n\n{self.response_marker}")

    def segments(self, tokenizer: "Tokenizer", record: dict) -> Segments:
        if "messages" not in record:
            instruction, input = tokenizer.escape(record["instruction"]), tokenizer.escape(record.get("input", ""))
            return [(self.instruction(instruction, input), False), (tokenizer.escape(record["output"]), True)]
        roles = [message["role"] for message in record["messages"]]
        if roles != ["user", "assistant"]:
            raise UserError(f"the alpaca prompt style holds one instruction and its answer, not a conversation of "
                            f"{roles}: prepare with --prompt_style chat (the model's chat template)")
        question, answer = escaped(tokenizer, record["messages"])
        return [(self.instruction(question["content"]), False), (answer["content"], True)]


class Chat(PromptStyle):
    """The model's own chat template; it writes its own BOS and closes each answer with its end-of-turn token."""

    name = "chat"

    def render(self, tokenizer: "Tokenizer", messages: list[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def adds_bos(self, tokenizer: "Tokenizer") -> bool:
        return False

    def split_closing(self, ids: list[int], learned: list[bool],
                      tokenizer: "Tokenizer") -> tuple[list[int], list[bool], list[int]]:
        """The sample without its trailing turns that hold no answer, cut before its closing: the last answer's
        end-of-turn token and what the template writes after it (EOS where the answer has no stop token)."""
        answers = [i for i, learn in enumerate(learned) if learn]
        ids, learned = ids[:answers[-1] + 1], learned[:answers[-1] + 1]
        stops = [i for i in answers if ids[i] in tokenizer.stop_ids]
        end = stops[-1] if stops else len(ids)
        return ids[:end], learned[:end], ids[end:] or [tokenizer.eos_id]


STYLES: dict[str, PromptStyle] = {style.name: style for style in (Plain(), Alpaca(), Chat())}
StyleName = Literal[tuple(STYLES)]  # type: ignore[valid-type]
"""A prompt style's name, as options and files give it."""
LEGACY_STYLE = Alpaca.name
"""The style of prepared sets, adapter files and training states from before styles were recorded."""
BASE_MODEL_STYLE = Plain.name
"""How prompts to a base model without an adapter are written unless an option says otherwise."""


def style_for_records(records: list[dict], tokenizer: "Tokenizer") -> str:
    """The style that suits training ``records`` by default: the model's chat template for chat records (if it has
    one), else ``LEGACY_STYLE``, the paper's Alpaca template."""
    return Chat.name if tokenizer.chat_template and any("messages" in r for r in records) else LEGACY_STYLE


def chat_style_for(tokenizer: "Tokenizer") -> str:
    """The style a base model answers chat messages in: its chat template if it has one, else plain text."""
    return Chat.name if tokenizer.chat_template else Plain.name


def get_style(name: Optional[str]) -> PromptStyle:
    """The style called ``name`` (None: ``LEGACY_STYLE``), or a one-line ``UserError``."""
    name = LEGACY_STYLE if name is None else name
    if not isinstance(name, str) or name not in STYLES:
        raise UserError(f"unknown prompt style {name!r}: choose one of {', '.join(STYLES)}")
    return STYLES[name]


def user_message(instruction: str, input: str = "") -> Message:
    """An Alpaca instruction (and optional input) as a chat user turn."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}


def record_messages(record: dict) -> list[Message]:
    """The conversation of a training record: its ``messages``, or an Alpaca record as a user and an assistant turn."""
    if "messages" in record:
        return record["messages"]
    return [user_message(record["instruction"], record.get("input", "")),
            {"role": "assistant", "content": record["output"]}]


def escaped(tokenizer: "Tokenizer", messages: list[Message]) -> list[Message]:
    """``messages`` with their contents ``escape``-d: special-token spellings in them stay text when rendered."""
    return [{**message, "content": tokenizer.escape(message["content"])} for message in messages]


ANSWER_START, ANSWER_END = "\ufdd0", "\ufdd1"
"""Unicode noncharacters that mark the answers in one rendering of a whole conversation."""


def conversation_segments(style: PromptStyle, tokenizer: "Tokenizer", messages: list[Message]) -> Segments:
    """``messages`` (escaped) rendered once, each answer learned from where the ``prompt`` of the turns before it
    ends through the end-of-turn token that the style writes right after it.

    Answers are found by marking their text inside its white space (which a template may strip). The last answer
    must follow its ``prompt``; what the template writes between a prompt and an answer (a space, say) is taken from
    it for every answer."""
    if any(ANSWER_START in m["content"] or ANSWER_END in m["content"] for m in messages):
        raise UserError("a message holds the Unicode noncharacter U+FDD0 or U+FDD1, which marks answers while "
                        "preparing: remove it from the data")
    answers = [turn for turn, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    marked = [{**m, "content": _marked(m["content"])} if m["role"] == "assistant" and m["content"].strip() else m
              for m in messages]
    pieces = re.split(f"[{ANSWER_START}{ANSWER_END}]", style.render(tokenizer, marked, add_generation_prompt=False))
    if len(pieces) != 2 * len(answers) + 1:
        raise UserError(f"the {style.name} style does not write each answer of a conversation once as it is, so "
                        "answers cannot be told apart from prompts")
    if not answers:
        return [(pieces[0], False)]
    lead = _lead(style, tokenizer, messages[:answers[-1] + 1], "".join(pieces[:-2]))
    segments, before = [], pieces[0]
    for turn, answer, after in zip(answers, pieces[1::2], pieces[2::2]):
        content = messages[turn]["content"]
        start = _answer_start(before, lead, content[:len(content) - len(content.lstrip())], style)
        end = _closing(tokenizer, after)
        segments += [(before[:start], False), (before[start:] + answer + after[:end], True)]
        before = after[end:]
    return [(piece, learned) for piece, learned in segments + [(before, False)] if piece]


def _marked(content: str) -> str:
    """``content`` with ``ANSWER_START`` and ``ANSWER_END`` around its text, inside its leading and trailing white
    space."""
    text = content.strip()
    start = content.index(text)
    return f"{content[:start]}{ANSWER_START}{text}{ANSWER_END}{content[start + len(text):]}"


def _lead(style: PromptStyle, tokenizer: "Tokenizer", messages: list[Message], before: str) -> str:
    """What the style writes between the prompt of the last answer of ``messages`` and the answer's own text, which
    follows ``before``; a style whose rendering does not begin with that prompt is refused."""
    prompt, content = style.render(tokenizer, messages[:-1], add_generation_prompt=True), messages[-1]["content"]
    if not before.startswith(prompt):
        raise UserError(f"the {style.name} style does not render conversations turn by turn (the text before the "
                        "last answer differs from its prompt), so answers cannot be told apart from prompts")
    lead, space = before[len(prompt):], content[:len(content) - len(content.lstrip())]
    return lead[:len(lead) - len(space)] if space and lead.endswith(space) else lead


def _answer_start(before: str, lead: str, space: str, style: PromptStyle) -> int:
    """Where in ``before`` (the text before an answer) the learned part starts: at the ``lead`` that the style
    writes before an answer and the answer's leading white ``space`` (if the style keeps it)."""
    for written in (lead + space, lead):
        if before.endswith(written):
            return len(before) - len(written)
    raise UserError(f"the {style.name} style writes another text before some answers than before the last one, so "
                    "answers cannot be told apart from prompts")


def _closing(tokenizer: "Tokenizer", after: str) -> int:
    """How much of ``after``, the text after an answer, closes it: through its first special token if that ends a
    turn, else nothing."""
    marker = tokenizer.first_special(after)
    return marker.end() if marker and tokenizer.special_tokens[marker.group()] in tokenizer.stop_ids else 0
