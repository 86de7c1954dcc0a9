"""The tokenizer shipped in an export: ``tokenizers`` for ids, jinja2 for the chat template.

Reads ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, and the chat template when it
is stored there) and ``chat_template.jinja`` from the files the manifest lists, never through a symbolic
link or from outside the export (:func:`~shadowpeft.runtime.manifest_files.export_file`). The template is
rendered in jinja2's sandbox, as Hugging Face renders it, within the bounds of
:class:`~shadowpeft.runtime.chat_template.ChatTemplate`, and the result is encoded without adding special
tokens (the template writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer

from shadowpeft.runtime.chat_template import ChatTemplate, TemplateLimits
from shadowpeft.runtime.errors import ExportLoadError
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import export_file

__all__ = ["RuntimeTokenizer"]


@dataclass
class RuntimeTokenizer:
    """Encode/decode and chat formatting for one export.

    Attributes:
        tokenizer: The ``tokenizers`` tokenizer.
        chat_template: Jinja chat template, or ``None`` when the export has none.
        special: Special tokens by role (``eos_token``, ``bos_token``, ``pad_token``...).
        template_limits: Bounds on rendering the chat template (size, loops, output, time).
    """

    tokenizer: Tokenizer
    chat_template: str | None
    special: dict[str, str]
    template_limits: TemplateLimits = field(default_factory=TemplateLimits)
    _compiled: ChatTemplate | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_export(cls, root: Path, manifest: Manifest) -> RuntimeTokenizer:
        """Loads the tokenizer files listed in ``manifest.tokenizer_files`` under ``root``.

        Raises:
            ExportLoadError: No ``tokenizer.json`` in the export, or an unreadable file.
        """
        return cls.from_files(root, manifest.tokenizer_files)

    @classmethod
    def from_files(cls, root: Path, names: tuple[str, ...] | list[str]) -> RuntimeTokenizer:
        """Loads tokenizer files (paths relative to ``root``): ``tokenizer.json`` and optional config/template.

        Raises:
            ExportLoadError: No ``tokenizer.json`` among them, or an unreadable file.
            ManifestError: A file is a symbolic link, or not inside ``root``.
        """
        files = {PurePosixPath(name).name: export_file(root, name) for name in names}
        if "tokenizer.json" not in files:
            raise ExportLoadError(
                f"The export at {root} lists no tokenizer.json among its tokenizer files "
                f"({', '.join(names) or 'none'}); re-export with shadow-export, which copies it."
            )
        try:
            tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
            config = json.loads(files["tokenizer_config.json"].read_text()) if "tokenizer_config.json" in files else {}
            template = files["chat_template.jinja"].read_text() if "chat_template.jinja" in files else None
        except (OSError, ValueError, Exception) as err:  # tokenizers raises its own Exception type
            raise ExportLoadError(f"Cannot read the tokenizer of the export at {root}: {err}. Re-export.") from err
        template = template or (config.get("chat_template") if isinstance(config.get("chat_template"), str) else None)
        special = {key: value for key, value in config.items() if key.endswith("_token") and isinstance(value, str)}
        return cls(tokenizer, template, special)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the EOS token (if the vocabulary has it)."""
        eos = self.special.get("eos_token")
        token = self.tokenizer.token_to_id(eos) if eos else None
        return () if token is None else (token,)

    @property
    def pad_id(self) -> int:
        """Id used for left padding in batches (pad, else EOS, else 0); masked out, so its value is irrelevant."""
        for key in ("pad_token", "eos_token"):
            token = self.special.get(key)
            if token is not None and self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        return 0

    def format_chat(self, prompt: str, *, system: str | None = None) -> str:
        """The prompt as one user turn (after an optional system turn), ready for the assistant's answer.

        Raises:
            ExportLoadError: The export has no chat template (pass ``chat=False`` to use the raw prompt).
            ChatTemplateError: The template is refused (too long, loads other templates), passed a rendering
                limit, or rejects the messages (a ``ValueError``).
        """
        if self.chat_template is None:
            raise ExportLoadError("This export's tokenizer has no chat template; run without chat formatting.")
        if self._compiled is None:
            self._compiled = ChatTemplate(self.chat_template, self.template_limits)
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": prompt})
        return self._compiled.render(
            messages=messages, add_generation_prompt=True, raise_exception=_raise, **self.special
        )

    def encode(self, text: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids of ``text``; with ``chat`` it is formatted with the chat template first (when there is one)."""
        if chat and self.chat_template is not None:
            return self.tokenizer.encode(self.format_chat(text, system=system), add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _raise(message: str) -> None:
    raise TemplateError(message)
