"""Data formats and prompt styles: JSON Lines, chat records, answers-only loss, styles recorded end to end."""

import json

import pytest
import torch

from lit_adapter.convert.hf import download_hf
from lit_adapter.data.prepare import tokenize_sample
from lit_adapter.data.records import load_records
from lit_adapter.errors import UserError
from lit_adapter.prompts import STYLES, get_style, user_message
from lit_adapter.tokenizer import Tokenizer

alpaca_prompt = STYLES["alpaca"].instruction

GOOD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_json_lines_load_by_suffix_and_by_content(tmp_path):
    expected = [GOOD, {"messages": CHAT["messages"]}]
    assert load_records(write_lines(tmp_path / "data.jsonl", [GOOD, CHAT])) == (expected, [])
    # a .json file holding JSON Lines is read as such, not reported as truncated
    assert load_records(write_lines(tmp_path / "data.json", [GOOD, CHAT])) == (expected, [])


@pytest.mark.parametrize("lines, fragment", [
    (['{"instruction": "a", "output": "b"}', "{oops"], "line 2 is not valid JSON"),
    ([json.dumps(GOOD), json.dumps({"output": "b"})], "line 2 has no 'instruction'"),
    ([json.dumps({"messages": []})], "line 1: 'messages' must be a non-empty list"),
    ([json.dumps({"messages": [{"role": "bot", "content": "x"}]})], "line 1: message 0 has role 'bot'"),
    ([json.dumps({"messages": [{"role": "user"}]})], "line 1: message 0 needs a string 'content'"),
    ([json.dumps({"messages": [{"role": "user", "content": "Hi"}]})], "line 1 has no assistant answer"),
    ([json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]})],
     "line 1 has no assistant answer"),
])
def test_bad_json_lines_name_the_line(tmp_path, lines, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        load_records(path)
    assert str(path) in str(err.value) and fragment in str(err.value) and "\n" not in str(err.value)


def test_alpaca_style_takes_a_single_turn_chat_record_as_an_instruction(llama_tokenizer):
    tok = Tokenizer(llama_tokenizer)
    single = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    assert get_style("alpaca").segments(tok, single) == [(alpaca_prompt("Add 2 and 3."), False), ("5", True)]
    assert get_style("alpaca").prompt(tok, [user_message("Add 2 and 3.")]) == alpaca_prompt("Add 2 and 3.")
    with pytest.raises(UserError, match="alpaca prompt style holds one instruction and its answer, not a conversation"):
        tokenize_sample(CHAT, tok, 512, style="alpaca")
    sample, _ = tokenize_sample(single, tok, 512, style="alpaca")
    expected, _ = tokenize_sample({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, tok, 512)
    assert torch.equal(sample["input_ids"], expected["input_ids"]) and torch.equal(sample["labels"], expected["labels"])


def test_chat_style_needs_a_chat_template(llama_tokenizer):
    with pytest.raises(UserError, match="chat template"):
        tokenize_sample(GOOD, Tokenizer(llama_tokenizer), 512, style="chat")


def test_download_errors_are_one_line_and_say_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"could not download org/model .*copy the model's folder"):
        download_hf("org/model", tmp_path)

    def gated(*args, **kwargs):
        raise GatedRepoError.__new__(GatedRepoError)  # as the Hub client raises it for a gated repository

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(UserError, match="org/model is gated: accept its license.*--token or set HF_TOKEN"):
        download_hf("org/model", tmp_path)


def test_a_long_conversation_prepares_in_work_linear_in_its_turns(llama3_converted, monkeypatch):
    """Characters rendered by the chat template and tokenized, for a chat record of N and of 2N turns."""
    from lit_adapter.chat_template import ChatTemplate

    tokenizer, work = Tokenizer(llama3_converted), {"characters": 0}
    render, spans = ChatTemplate.render, tokenizer.backend.spans

    def counted_render(self, *args, **kwargs):
        text = render(self, *args, **kwargs)
        work["characters"] += len(text)
        return text

    def counted_spans(text):
        work["characters"] += len(text)
        return spans(text)

    monkeypatch.setattr(ChatTemplate, "render", counted_render)
    monkeypatch.setattr(tokenizer.backend, "spans", counted_spans)
    used = {}
    for turns in (10_000, 20_000):
        messages = [{"role": "user" if turn % 2 == 0 else "assistant", "content": f"turn {turn}"}
                    for turn in range(turns)]
        work["characters"] = 0
        sample, truncated = tokenize_sample({"messages": messages}, tokenizer, 512, style="chat")
        used[turns] = work["characters"]
        assert truncated and sample["input_ids"].numel() == 512
    assert used[20_000] <= 2.2 * used[10_000]
