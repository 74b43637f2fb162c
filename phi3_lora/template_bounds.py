"""Chat templates rendered in bounded time and size.

A chat template is Jinja text that anyone can hand the app: the Settings tab's template box, or the tokenizer of an
adapter published on the Hub that a visitor names in Compare. transformers renders it in Jinja's immutable sandbox,
which stops attribute tricks but not cost: two nested loops over `range(100000)`, `'x' * 10**9` or `9**9**9` keep the
app's process busy (or fill its memory) for as long as they like. No maintained library bounds a Jinja render, so this
module does, inside the sandbox transformers already uses (`install` makes transformers compile every chat template
with `BoundedSandbox`):

- a template's text is at most MAX_TEMPLATE_CHARS;
- a render ends after RENDER_SECONDS (a watchdog thread raises into the rendering thread past its deadline);
- no value it builds (an operator's, a call's or a filter's result, a `~` join, the output) exceeds MAX_CHARS, and
  the operations that can multiply sizes in one step of C code (`*`, `**`, `%`, `center`, `replace`, `join`, ...)
  are refused before they run when their result could exceed it.

A refusal is a TemplateTooHeavy (a UserError) that says the template is too heavy.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
import time
from typing import Any, Callable, Iterator

from jinja2.compiler import CodeGenerator
from jinja2.environment import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phi3_lora.errors import UserError

log = logging.getLogger(__name__)

MAX_TEMPLATE_CHARS = 64 * 1024   # Llama-3.1's tool-calling template, the largest common one, is ~5 KB
MAX_CHARS = 16 * 2**20           # any one value a render builds, and its output (a long-context row is < 1 MiB)
MAX_INT_BITS = 4096              # integers a template computes (a chat template counts turns, nothing bigger)
RENDER_SECONDS = 2.0             # a chat template renders in well under a millisecond per conversation
_FORMAT_NUMBER = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?|\{[^{}]*?[:!][^{}]*?(\d+)[^{}]*\}")


class TemplateTooHeavy(UserError):
    def __init__(self, what: str) -> None:
        super().__init__(f"The chat template is too heavy: {what}.",
                         hint="A chat template only joins the messages with their role markers; use the model's own "
                              "template, or simplify this one (no long loops, no huge repeats).")


def _size(value: Any) -> int:
    """Characters (or items) a value holds, one level deep: what an operation on it can multiply."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        items = value.values() if isinstance(value, dict) else value
        return len(value) + sum(len(v) for v in items if isinstance(v, (str, bytes)))
    return 0


def _magnitude(value: Any) -> int:
    """How far a value can stretch another in one call: its length, or an integer's value (a width, a count)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return abs(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        items = list(value.values() if isinstance(value, dict) else value)
        return max([len(items)] + [len(v) for v in items if isinstance(v, (str, bytes))])
    return _size(value)


def check_result(value: Any, what: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise TemplateTooHeavy(f"{what} computes a number of more than {MAX_INT_BITS} bits")
    if _size(value) > MAX_CHARS:
        raise TemplateTooHeavy(f"{what} builds a value of more than {MAX_CHARS:,} characters")
    return value


def check_call(what: str, values: list[Any]) -> None:
    """Before a call or filter runs: the two largest magnitudes among its receiver and arguments bound what one step
    of C code can build (a width times a string, a string's occurrences times a replacement, items times a length)."""
    sizes = sorted((_magnitude(v) for v in values), reverse=True) + [0, 0]
    if sum(_size(v) for v in values) + sizes[0] * max(1, sizes[1]) > MAX_CHARS and sizes[1] > 1:
        raise TemplateTooHeavy(f"{what} could build more than {MAX_CHARS:,} characters")
    if sizes[0] > MAX_CHARS:
        raise TemplateTooHeavy(f"{what} is given a size of {sizes[0]:,}")


def check_binop(operator: str, left: Any, right: Any) -> None:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
    if operator == "**" and ints and right > 0 and max(1, left.bit_length()) * right > MAX_INT_BITS:
        raise TemplateTooHeavy(f"{left} ** {right} is a number of more than {MAX_INT_BITS} bits")
    if operator == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateTooHeavy(f"a product of more than {MAX_INT_BITS} bits")
        count = left if isinstance(left, int) else right if isinstance(right, int) else 1
        seq = right if isinstance(left, int) else left
        if not ints and _size(seq) * max(0, count) > MAX_CHARS:
            raise TemplateTooHeavy(f"repeating {_size(seq):,} characters {count:,} times")
    if operator == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        _check_format(left, args)
    if operator == "+":
        if _size(left) + _size(right) > MAX_CHARS:
            raise TemplateTooHeavy(f"joining values of more than {MAX_CHARS:,} characters")


def _check_format(fmt: str, args: tuple[Any, ...]) -> None:
    """A format string's widths and precisions (`%0999999999d`, `{:>999999999}`) are sizes too."""
    for m in _FORMAT_NUMBER.finditer(fmt):
        for number in m.groups():
            if number == "*":
                raise TemplateTooHeavy("a format width taken from the arguments ('*')")
            if number and int(number) > MAX_CHARS:
                raise TemplateTooHeavy(f"a format width of {int(number):,}")
    check_call("formatting", [fmt, *args])


class _RenderDeadline(BaseException):
    """Raised into a rendering thread past its deadline (a BaseException: no `except Exception` in Jinja eats it)."""


class _Watchdog:
    """One daemon thread that raises _RenderDeadline into any thread still rendering past its deadline (CPython's
    PyThreadState_SetAsyncExc, delivered between bytecodes: the template's loops, Jinja's runtime, lipsum). It costs
    a render two dictionary updates; a trace function on every line and call cost 3-8x the render itself."""

    REFIRE_SECONDS = 1.0  # again, while the thread still renders (in case something swallowed the first)

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, list[float]] = {}   # thread id -> [deadline, time fired (0: not yet)]
        self._thread: threading.Thread | None = None

    def _raise_in(self, thread_id: int, exc: type[BaseException] | None) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                if not self._due:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for thread_id, entry in self._due.items():
                    if now >= entry[0] and now >= entry[1] + self.REFIRE_SECONDS:
                        entry[1] = now
                        self._raise_in(thread_id, _RenderDeadline)
                wake = min(e[0] if not e[1] else e[1] + self.REFIRE_SECONDS for e in self._due.values())
                self._cond.wait(timeout=max(0.001, wake - now))

    def _unregister(self, thread_id: int) -> bool:
        with self._cond:
            entry = self._due.pop(thread_id, None)
            fired = bool(entry and entry[1])
            if fired:
                self._raise_in(thread_id, None)  # drop one raised but not delivered yet
            return fired

    def run(self, step: Callable[[], Any], seconds: float, until: float | None = None) -> Any:
        """step() in this thread, stopped with TemplateTooHeavy at `until` (monotonic), else `seconds` from now."""
        thread_id = threading.get_ident()
        with self._cond:
            if thread_id in self._due:  # a template rendered inside a render: the outer deadline holds
                return step()
            self._due[thread_id] = [until if until is not None else time.monotonic() + seconds, 0.0]
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="phi3-template-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            try:
                result = step()
            finally:
                fired = self._unregister(thread_id)
        except _RenderDeadline:
            self._unregister(thread_id)
            raise TemplateTooHeavy(f"rendering it took longer than {seconds:g} s") from None
        if fired:  # it ran out as it finished: the result stands, the raised exception was dropped
            log.info("a chat template finished at its deadline")
        return result


_WATCHDOG = _Watchdog()


class BoundedTemplate(Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        return _WATCHDOG.run(lambda: super(BoundedTemplate, self).render(*args, **kwargs), RENDER_SECONDS)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """Part by part (transformers' assistant mask reads the parts as they come), under one deadline; the
        deadline covers the template's steps only, never the consumer's code between them."""
        until, parts = time.monotonic() + RENDER_SECONDS, super().generate(*args, **kwargs)
        total = 0
        while True:
            try:
                part = _WATCHDOG.run(lambda: next(parts), RENDER_SECONDS, until)
            except StopIteration:
                return
            total += len(part)
            if total > MAX_CHARS:
                raise TemplateTooHeavy(f"its output is longer than {MAX_CHARS:,} characters")
            yield part


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: checked like any other value built
        self.write("environment.bounded_join(")
        super().visit_Concat(node, frame)
        self.write(")")


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in (*args, *kwargs.values()) if not _is_jinja_state(a)]
        check_call(f"the filter {name!r}", values)
        return check_result(func(*args, **kwargs), f"the filter {name!r}")

    return bounded


def _is_jinja_state(value: Any) -> bool:
    return type(value).__module__.startswith("jinja2.") and not isinstance(value, str)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox with bounds (see the module docstring); the operators that can multiply sizes are
    intercepted (which also stops Jinja from folding them into constants while it compiles)."""

    intercepted_binops = frozenset({"*", "**", "%", "+", "//"})
    template_class = BoundedTemplate
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters = _BoundedFilters(self.filters)

    def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, str) and len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateTooHeavy(f"it is {len(source):,} characters long; the limit is {MAX_TEMPLATE_CHARS:,}")
        return super().from_string(source, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_binop(operator, left, right)
        return check_result(super().call_binop(context, operator, left, right), f"the operator {operator!r}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        what = f"calling {getattr(__obj, '__name__', type(__obj).__name__)!r}"
        receiver = getattr(__obj, "__self__", None)
        check_call(what, [v for v in (receiver, *args, *kwargs.values()) if not _is_jinja_state(v)])
        return check_result(super().call(__context, __obj, *args, **kwargs), what)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`'...'.format(...)`: Jinja hands out its sandboxed formatter when the attribute is read; its widths and
        arguments are checked when it is called."""
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        fmt = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, (*args, *kwargs.values()))
            return check_result(formatter(*args, **kwargs), "formatting")

        return bounded

    def bounded_join(self, joined: str) -> str:
        return check_result(joined, "joining values with '~'")

    def concat(self, parts: Any) -> str:  # the output, part by part
        out, total = [], 0
        for part in parts:
            total += len(part)
            if total > MAX_CHARS:
                raise TemplateTooHeavy(f"its output is longer than {MAX_CHARS:,} characters")
            out.append(part)
        return "".join(out)


class _BoundedFilters(dict):
    """The environment's filters, each bounded (transformers adds `tojson` after creating the environment)."""

    def __init__(self, filters: dict[str, Callable[..., Any]]) -> None:
        super().__init__({name: _bounded_filter(name, f) for name, f in filters.items()})

    def __setitem__(self, name: str, func: Callable[..., Any]) -> None:
        super().__setitem__(name, _bounded_filter(name, func))


_installed = False


def install() -> None:
    """Make transformers compile every chat template in this process with BoundedSandbox (once; templates compiled
    before are dropped from its cache). transformers names the class it instantiates in chat_template_utils."""
    global _installed
    if _installed:
        return
    from transformers.utils import chat_template_utils as ctu

    if getattr(ctu, "ImmutableSandboxedEnvironment", None) is None:
        log.warning("transformers no longer builds chat templates where phi3_lora bounds them: renders are unbounded")
        return
    ctu.ImmutableSandboxedEnvironment = BoundedSandbox
    for name in ("_compile_jinja_template", "_cached_compile_jinja_template"):
        cache_clear = getattr(getattr(ctu, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    _installed = True
