"""The shipped tokenizer: same ids as transformers, chat template rendered the same way."""

from __future__ import annotations

from transformers import AutoTokenizer

from shadowpeft.runtime.tokenizer import RuntimeTokenizer
from tests.toy import save_toy_base

CHATML = (
    "{% for message in messages %}{{ bos_token + message['role'] + ' : ' + message['content'] + ' ' + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant : ' }}{% endif %}"
)


def test_ids_and_chat_template_match_transformers(tmp_path):
    base = save_toy_base(tmp_path / "base")
    reference = AutoTokenizer.from_pretrained(base)
    reference.chat_template = CHATML
    files = reference.save_pretrained(tmp_path / "tok")
    names = [
        p.name for p in map(lambda f: tmp_path / "tok" / f, [str(f).split("/")[-1] for f in files]) if p.is_file()
    ]
    tokenizer = RuntimeTokenizer.from_files(tmp_path / "tok", names)
    text = "repeat the color : red 5"
    assert tokenizer.encode(text, chat=False) == reference(text)["input_ids"]
    expected = reference.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tokenizer.encode(text, chat=True) == list(expected)
    assert tokenizer.eos_ids == (reference.eos_token_id,)
    assert tokenizer.decode(tokenizer.encode(text, chat=False)) == reference.decode(
        reference(text)["input_ids"], skip_special_tokens=True
    )


def test_export_without_template_encodes_raw_text(toy_export):
    from shadowpeft.runtime.export_dir import open_export

    export = open_export(toy_export.export)
    tokenizer = RuntimeTokenizer.from_export(export.root, export.manifest)
    assert tokenizer.chat_template is None
    assert tokenizer.encode("the color is red") == tokenizer.encode("the color is red", chat=False)
