"""A chat template rendered within limits: the template comes with the export, so it is data, not trusted code.

jinja2's sandbox (as Hugging Face uses it) stops a template from reaching Python internals, but not from
running forever or filling memory: ``{% for i in range(10**5) %}`` nested twice spins for hours, and a
50 MB template takes seconds to parse. :class:`ChatTemplate` adds the bounds, each a
:class:`~shadowpeft.runtime.errors.ChatTemplateError` that names the limit::

    source  -- size <= max_source_chars --> parse --> refuse include/import/extends
            --> rewrite: every {% for %} iterable and every ``~`` through a counting helper
            --> render chunk by chunk (template.generate()): output <= max_output_chars, time <= max_seconds

While it renders, ``range()`` is capped at ``max_range`` items, all loops together at ``max_iterations``
steps, ``*``/``+``/``**``/``%`` and ``~`` refuse results past the output limit, and no call may pass an
integer larger than it (``'x'.center(10**9)``).
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import BaseLoader, nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shadowpeft.runtime.errors import ChatTemplateError

__all__ = ["ChatTemplate", "TemplateLimits"]

_ITER = "__shadowpeft_bounded_iter"
_CONCAT = "__shadowpeft_bounded_concat"
_NUMBER = re.compile(r"\d+")
#: What a template may raise besides TemplateError: its own type and lookup mistakes, and the bounds'
#: last resorts (Python's recursion limit, float overflow).
_TEMPLATE_FAULTS = (
    TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
    RecursionError,
)


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on rendering one chat template; the defaults are far above what a real chat template needs.

    Attributes:
        max_source_chars: Longest template accepted (SmolLM2's is ~500 characters, Llama 3.1's ~5,000).
        max_output_chars: Longest rendered prompt, and largest string, list or integer argument made on the way.
        max_range: Most items one ``range()`` may have.
        max_iterations: Most loop steps of one rendering, all ``{% for %}`` loops together.
        max_seconds: Longest one rendering may take (checked at every loop step, call and output chunk).
    """

    max_source_chars: int = 1_000_000
    max_output_chars: int = 1_000_000
    max_range: int = 10_000
    max_iterations: int = 100_000
    max_seconds: float = 2.0


class _Budget:
    """One rendering's clock and loop-step count."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_iterations:
            raise ChatTemplateError(
                f"The chat template ran more than {self.limits.max_iterations:,} loop steps (nested loops?); "
                "a chat template loops over the messages. Fix the template in the export's tokenizer files, "
                "or run without chat formatting (--no-chat)."
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() >= self.deadline:
            raise ChatTemplateError(
                f"The chat template took longer than {self.limits.max_seconds:g} s to render; a chat template "
                "formats a few messages in milliseconds. Fix the template, or run without chat formatting (--no-chat)."
            )


_CURRENT: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


class _NoLoader(BaseLoader):
    """Templates cannot load other templates: a chat template is one self-contained string."""

    def get_source(self, environment: Any, template: str) -> Any:
        raise ChatTemplateError(_no_load_message(repr(template)))


def _no_load_message(what: str) -> str:
    return (
        f"The chat template tries to load another template ({what}); include, import and extends are refused, "
        "since they would read files outside the export. Inline it in the template, or run without chat "
        "formatting (--no-chat)."
    )


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with size checks on the operators and calls that can blow up a string."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self, limits: TemplateLimits) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, loader=_NoLoader())
        self.limits = limits
        self.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs; no chat template uses it
        self.globals["range"] = self._range
        self.globals[_ITER] = self._iterate
        self.globals[_CONCAT] = self._concat
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}

    # -- helpers the rewritten template calls ----------------------------------------------------------

    def _range(self, *args: int) -> range:
        self._check_ints(args, "range")
        items = range(*args)
        if len(items) > self.limits.max_range:
            raise ChatTemplateError(
                f"The chat template asks for range{args!r} ({len(items):,} items); at most "
                f"{self.limits.max_range:,} are allowed. Fix the template, or run without chat formatting (--no-chat)."
            )
        return items

    def _iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = _CURRENT.get()
        for item in iterable:
            if budget is not None:
                budget.step()
            yield item

    def _concat(self, *values: Any) -> str:
        parts = [str(value) for value in values]
        self._check_size(sum(map(len, parts)), "'~'")
        return "".join(parts)

    # -- sandbox hooks ----------------------------------------------------------------------------------

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's form)
        budget = _CURRENT.get()
        if budget is not None:
            budget.check_time()
        __self._check_ints((*args, *kwargs.values()), getattr(__obj, "__name__", "a call").lstrip("_"))
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        sized = (str, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, sized):
            left, right = right, left
        if operator == "*" and isinstance(left, sized) and isinstance(right, int):
            self._check_size(len(left) * right, "'*'")
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            self._check_size(len(left) + len(right), "'+'")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self._check_size(abs(left).bit_length() * right // 3, "'**' (digits)")  # ~3.3 bits a digit
        if operator == "%" and isinstance(left, str):
            self._check_format(left)
            self._check_ints(right if isinstance(right, tuple) else (right,), "'%'")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_format(value.__self__)
        return wrapped

    # -- checks -------------------------------------------------------------------------------------------

    def _bounded(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def bounded(*args: Any, **kwargs: Any) -> Any:
            budget = _CURRENT.get()
            if budget is not None:
                budget.check_time()
            self._check_ints((*args, *kwargs.values()), f"filter {getattr(func, '__name__', '?')}")
            return func(*args, **kwargs)

        bounded.__dict__.update(getattr(func, "__dict__", {}))  # keeps jinja's pass_context / pass_eval_context marks
        bounded.__name__ = getattr(func, "__name__", "filter")
        return bounded

    def _check_ints(self, values: Iterable[Any], where: str) -> None:
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_output_chars:
                raise ChatTemplateError(
                    f"The chat template passes {value:,} to {where}; numbers above "
                    f"{self.limits.max_output_chars:,} (the output limit) are refused. Fix the template, or run "
                    "without chat formatting (--no-chat)."
                )

    def _check_format(self, text: str) -> None:
        widths = (int(number) for number in _NUMBER.findall(text) if len(number) > 6)
        self._check_ints(widths, "a format width")

    def _check_size(self, size: int, where: str) -> None:
        if size > self.limits.max_output_chars:
            raise ChatTemplateError(
                f"The chat template builds a value of {size:,} items with {where}; the limit is "
                f"{self.limits.max_output_chars:,}. Fix the template, or run without chat formatting (--no-chat)."
            )


class ChatTemplate:
    """A chat template checked and compiled once, rendered within :class:`TemplateLimits`.

    Args:
        source: The Jinja template (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``).
        limits: The bounds.

    Raises:
        ChatTemplateError: The source is too long, is not valid Jinja, or includes, imports or extends
            another template.
    """

    def __init__(self, source: str, limits: TemplateLimits | None = None) -> None:
        self.limits = limits or TemplateLimits()
        if len(source) > self.limits.max_source_chars:
            raise ChatTemplateError(
                f"The chat template is {len(source):,} characters long; at most {self.limits.max_source_chars:,} "
                "are accepted (real chat templates have a few thousand). Fix the template in the export's "
                "tokenizer files, or run without chat formatting (--no-chat)."
            )
        self._environment = _BoundedEnvironment(self.limits)
        try:
            tree = self._environment.parse(source)
            for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
                raise ChatTemplateError(_no_load_message(f"{type(node).__name__.lower()} at line {node.lineno}"))
            self._template = self._environment.from_string(_bounded_tree(tree))
        except ChatTemplateError:
            raise
        except (TemplateError, RecursionError) as err:
            raise ChatTemplateError(f"The chat template is not valid Jinja: {err}. Fix the template.") from err

    def render(self, **context: Any) -> str:
        """Renders the template with ``context`` (``messages``, ``add_generation_prompt``, special tokens...).

        Raises:
            ChatTemplateError: A limit was reached, or the template failed (``raise_exception`` included).
        """
        budget = _Budget(self.limits)
        token = _CURRENT.set(budget)
        chunks: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(**context):
                chunks.append(chunk)
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise ChatTemplateError(
                        f"The chat template's output passed {self.limits.max_output_chars:,} characters; a "
                        "prompt is rarely a thousandth of that. Fix the template, or run without chat "
                        "formatting (--no-chat)."
                    )
                budget.check_time()
        except ChatTemplateError:
            raise
        except _TEMPLATE_FAULTS as err:
            raise ChatTemplateError(f"The chat template could not format the prompt: {err}") from err
        finally:
            _CURRENT.reset(token)
        return "".join(chunks)


def _bounded_tree(tree: nodes.Template) -> nodes.Template:
    """Routes every loop's iterable and every ``~`` concatenation through the environment's counting helpers."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(_ITER, "load"), [loop.iter], [], None, None, lineno=loop.lineno)
    for parent in list(tree.find_all(nodes.Node)):
        for field in parent.fields:
            value = getattr(parent, field, None)
            if isinstance(value, nodes.Concat):
                setattr(parent, field, _concat_call(value))
            elif isinstance(value, list):  # in place: a Call made earlier may hold this very list
                value[:] = [_concat_call(v) if isinstance(v, nodes.Concat) else v for v in value]
    return tree


def _concat_call(node: nodes.Concat) -> nodes.Call:
    return nodes.Call(nodes.Name(_CONCAT, "load"), node.nodes, [], None, None, lineno=node.lineno)
