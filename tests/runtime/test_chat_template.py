"""The chat template rendered within limits: every refusal is a ChatTemplateError, and shadow-run shows it cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from jinja2.exceptions import TemplateError

from shadowpeft.runtime.chat_template import ChatTemplate, TemplateLimits
from shadowpeft.runtime.errors import ChatTemplateError, ManifestError
from shadowpeft.runtime.manifest import MANIFEST_NAME, Manifest
from shadowpeft.runtime.manifest_files import file_sha256
from shadowpeft.runtime.run_cli import main as run_main
from shadowpeft.runtime.tokenizer import RuntimeTokenizer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
CHATML = (
    "{% for m in messages %}{{ bos_token ~ m['role'] ~ ' : ' ~ m['content'] ~ eos_token }}"
    "{% if loop.last and add_generation_prompt %}{{ bos_token + 'assistant : ' }}{% endif %}{% endfor %}"
)


def _render(source: str, limits: TemplateLimits | None = None) -> str:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    return ChatTemplate(source, limits).render(
        messages=MESSAGES,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
        raise_exception=raise_exception,
    )


def test_an_ordinary_template_renders_as_jinja_would() -> None:
    assert _render(CHATML) == "<s>system : be brief</s><s>user : hi</s><s>assistant : "
    assert _render("{% for i in range(3) %}{{ loop.index }}{{ '%02d' % i }}{% endfor %}") == "100201302"
    assert _render("{{ '{:>4}'.format('x') ~ ('a' * 3) ~ (2 ** 10) }}") == "   xaaa1024"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% include 'other.jinja' %}", "tries to load another template (include at line 1)"),
        ("{% include '/etc/hostname' ignore missing %}", "tries to load another template (include at line 1)"),
        ("{% import 'macros.jinja' as m %}", "tries to load another template (import at line 1)"),
        ("{% from 'macros.jinja' import m %}", "tries to load another template (fromimport at line 1)"),
        ("{% extends 'base.jinja' %}", "tries to load another template (extends at line 1)"),
        ("{% for i in range(20000) %}{% endfor %}", "asks for range(20000,) (20,000 items); at most 10,000"),
        ("{% for i in range(10**9) %}{% endfor %}", "passes 1,000,000,000 to range"),
        (
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
            "ran more than 100,000 loop steps",
        ),
        (
            "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
            "ran more than 100,000 loop steps",
        ),
        ("{% for i in range(10000) %}{{ 'x' * 200 }}{% endfor %}", "output passed 1,000,000 characters"),
        ("{{ 'x' * 10**9 }}", "builds a value of 1,000,000,000 items with '*'"),
        ("{{ 9 ** (9 ** 9) }}", "with '**' (digits)"),
        ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~'"),
        ("{{ 'x'.center(10**9) }}", "passes 1,000,000,000 to center"),
        ("{{ 'x' | center(10**9) }}", "passes 1,000,000,000 to filter"),
        ("{{ '{:999999999}'.format(1) }}", "passes 999,999,999 to a format width"),
        ("{{ '%999999999d' % 1 }}", "passes 999,999,999 to a format width"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "could not format the prompt: maximum recursion"),
        ("{{ 'a' + 1 }}", "could not format the prompt: can only concatenate str"),
        ("{{ raise_exception('only user and assistant roles') }}", "could not format the prompt: only user and"),
        ("{% for %}", "is not valid Jinja"),
    ],
)
def test_each_bound_is_a_clear_error(source: str, expected: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        _render(source)
    assert expected in str(info.value)


def test_a_50_mb_template_is_refused_before_parsing() -> None:
    with pytest.raises(
        ChatTemplateError, match=r"^The chat template is 50,000,000 characters long; at most 1,000,000"
    ):
        ChatTemplate("{{ 'x' }}" * (50_000_000 // 9) + "x" * (50_000_000 % 9))


def test_rendering_time_is_bounded() -> None:
    # A deadline already passed stops the first loop step: the time check runs inside loops, not only between
    # output chunks (a loop that writes nothing would otherwise never yield to a check).
    with pytest.raises(ChatTemplateError, match="took longer than 0 s to render"):
        _render("{% for i in range(3) %}{% endfor %}", TemplateLimits(max_seconds=0.0))


# --- through shadow-run: exit status 1, one message, no traceback ---------------------------------


def _export_with_template(toy_export, tmp_path: Path, template: str) -> Path:
    """A copy of the toy export whose tokenizer has ``template`` as its chat template, digests recorded."""
    export = tmp_path / "export"
    shutil.copytree(toy_export.export, export)
    (export / "tokenizer" / "chat_template.jinja").write_text(template)
    manifest = Manifest.from_file(export)
    files = tuple(sorted({*manifest.tokenizer_files, "tokenizer/chat_template.jinja"}))
    data = manifest.to_dict()
    data["tokenizer_files"] = list(files)
    data["tokenizer_sha256"] = {name: file_sha256(export / name) for name in files}
    (export / MANIFEST_NAME).write_text(json.dumps(data))
    return export


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% include 'secret.txt' %}", "tries to load another template"),
        ("{% import 'm.jinja' as m %}", "tries to load another template"),
        ("{% for i in range(100000000) %}{% endfor %}", "to range"),
        ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "loop steps"),
        ("x" * 2_000_000, "characters long"),
    ],
)
def test_shadow_run_reports_a_refused_template_without_traceback(toy_export, tmp_path, template, expected):
    export = _export_with_template(toy_export, tmp_path, template)
    result = CliRunner().invoke(run_main, [str(export), "-p", "the color", "--max-new-tokens", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: The chat template") and expected in result.output, result.output
    assert "Traceback" not in result.output
    if "include" in template:  # the raw prompt does not need the template
        plain = CliRunner().invoke(run_main, [str(export), "-p", "the color", "--max-new-tokens", "1", "--no-chat"])
        assert plain.exit_code == 0, plain.output


def test_a_template_linked_to_a_local_file_is_never_read(toy_export, tmp_path):
    export = _export_with_template(toy_export, tmp_path, "{{ 'x' }}")
    secret = tmp_path / "hostname"
    secret.write_text((export / "tokenizer" / "chat_template.jinja").read_text())  # same bytes, same digest
    (export / "tokenizer" / "chat_template.jinja").unlink()
    (export / "tokenizer" / "chat_template.jinja").symlink_to(secret)
    result = CliRunner().invoke(run_main, [str(export), "-p", "the color", "--max-new-tokens", "1"])
    assert result.exit_code == 1 and "is a symbolic link" in result.output, result.output
    with pytest.raises(ManifestError, match="is a symbolic link"):  # nor by the tokenizer, verified or not
        RuntimeTokenizer.from_files(export, ["tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"])
