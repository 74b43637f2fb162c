"""An Ollama Modelfile for an exported GGUF, and the commands that run it in llama.cpp and Ollama.

Ollama's TEMPLATE is a Go template, not Jinja, so the model's chat template cannot be copied. It is
measured instead: the Jinja template renders a conversation whose contents are unique marker strings,
and the text between the markers gives each role's prefix and the separators (pure string work, no
guessing per model family). `render_pieces` renders those pieces the way the Go template does, so a test
can hold the two renderings side by side.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError

_MARK = "\u2063phi3lora{}\u2063"  # contents no template adds or changes
SYSTEM, USER_1, ANSWER, USER_2 = (_MARK.format(n) for n in ("S", "U1", "A1", "U2"))


@dataclass(frozen=True)
class TemplatePieces:
    """A chat template as strings: head (before the first message) + per-message prefix/suffix.

    Rendering [system?] (user assistant)* user with a generation prompt:
      (system_head + S + system_suffix | head) + user_prefix + U + user_suffix + A + assistant_suffix
      + user_prefix + ... + U + user_suffix
    where user_suffix also holds the assistant prefix, so it doubles as the generation prompt."""

    head: str
    system_head: str | None  # None: the template drops system messages
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_suffix: str


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - 1 - n] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


def _between(text: str, start: str, end: str | None) -> str:
    i = text.index(start) + len(start)
    return text[i:] if end is None else text[i:text.index(end, i)]


def template_pieces(render: Any, specials: tuple[str, ...] = ()) -> TemplatePieces:
    """Measure a chat template. `render(messages) -> str` renders with the generation prompt.

    `specials`: the tokenizer's special tokens. The text that opens a user turn is whatever the turns before it
    all end with; any tail of it renders the same, and the one starting at the last special token (`<|im_start|>`
    rather than the previous turn's `<|im_end|>`) reads the way people write these templates."""
    plain = render([{"role": "user", "content": USER_1}, {"role": "assistant", "content": ANSWER},
                    {"role": "user", "content": USER_2}])
    head = plain[:plain.index(USER_1)]
    user_then_answer = _between(plain, USER_1, ANSWER)
    answer_then_user = _between(plain, ANSWER, USER_2)
    tail = _between(plain, USER_2, None)
    if tail != user_then_answer:
        raise UserError("The chat template ends a conversation differently from a turn; no Ollama TEMPLATE "
                        "could be derived.", hint="Use the GGUF with llama.cpp, which reads the Jinja template.")
    with_system = render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_1},
                          {"role": "assistant", "content": ANSWER}, {"role": "user", "content": USER_2}])
    has_system = SYSTEM in with_system
    system_then_user = _between(with_system, SYSTEM, USER_1) if has_system else ""
    user_prefix = _common_suffix(answer_then_user, head, *([system_then_user] if has_system else []))
    starts = [i for i in range(len(user_prefix)) if any(t and user_prefix.startswith(t, i) for t in specials)]
    user_prefix = user_prefix[starts[-1]:] if starts else user_prefix
    cut = len(user_prefix)
    system_head = with_system[:with_system.index(SYSTEM)] if has_system else None
    return TemplatePieces(head=head[:len(head) - cut], system_head=system_head,
                          system_suffix=system_then_user[:len(system_then_user) - cut],
                          user_prefix=user_prefix, user_suffix=user_then_answer,
                          assistant_suffix=answer_then_user[:len(answer_then_user) - cut])


def render_pieces(p: TemplatePieces, messages: list[dict[str, str]]) -> str:
    """What the Go template from `go_template(p)` renders for these messages (pure; mirrors it line by line)."""
    out = []
    system = [m for m in messages if m["role"] == "system"]
    if system and p.system_head is not None:
        out.append(p.system_head + system[0]["content"] + p.system_suffix)
    else:
        out.append(p.head)
    for m in messages:
        if m["role"] == "user":
            out.append(p.user_prefix + m["content"] + p.user_suffix)
        elif m["role"] == "assistant":
            out.append(m["content"] + p.assistant_suffix)
    return "".join(out)


def _go(text: str) -> str:
    """Text as a Go template literal: `{{` would open an action, so it goes through a string action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: TemplatePieces) -> str:
    """Ollama's TEMPLATE (Go text/template over .System and .Messages; Ollama gathers system messages into
    .System). One line with no whitespace-trimming actions, which would also trim the pieces' own newlines."""
    if p.system_head is not None:
        head = (f"{{{{ if .System }}}}{_go(p.system_head)}{{{{ .System }}}}{_go(p.system_suffix)}"
                f"{{{{ else }}}}{_go(p.head)}{{{{ end }}}}")
    else:
        head = _go(p.head)
    return (head + "{{ range .Messages }}"
            f'{{{{ if eq .Role "user" }}}}{_go(p.user_prefix)}{{{{ .Content }}}}{_go(p.user_suffix)}'
            f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{_go(p.assistant_suffix)}'
            "{{ end }}{{ end }}")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UserError("The chat template contains three double quotes in a row; Ollama's Modelfile cannot "
                        "hold it.", hint="Use the GGUF with llama.cpp, which reads the template from the file.")
    return f'"""{text}"""'


def modelfile(gguf_name: str, pieces: TemplatePieces, stops: list[str], *, temperature: float = 0.7,
              top_p: float = 0.9, num_ctx: int = 4096) -> str:
    """The Modelfile text: FROM the GGUF beside it, the TEMPLATE, stop tokens and default sampling."""
    lines = ["# Ollama Modelfile written by phi3_lora. Run: ollama create <name> -f Modelfile && ollama run <name>",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(pieces))}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {temperature}", f"PARAMETER top_p {top_p}", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def run_commands(gguf_path: Path, ollama_name: str, *, temperature: float = 0.7, top_p: float = 0.9) -> dict[str, str]:
    """The exact commands to chat with the file in llama.cpp and Ollama. They `cd` into its folder first, unless
    `gguf_path` is a bare file name: then they run in the folder that holds it, whatever it is called (a README
    inside a download that unpacks under the run's name)."""
    name = shlex.quote(gguf_path.name)
    cd = "" if gguf_path.parent == Path(".") else f"cd {shlex.quote(str(gguf_path.parent))} && "
    return {
        "llama.cpp chat": f"{cd}llama-cli -m {name} -cnv --temp {temperature} --top-p {top_p}",
        "llama.cpp server": f"{cd}llama-server -m {name} --jinja --port 8080   # then open http://127.0.0.1:8080",
        "Ollama": f"{cd}ollama create {ollama_name} -f Modelfile && ollama run {ollama_name}",
    }


def ollama_name(text: str) -> str:
    """A model name Ollama accepts: lowercase letters, digits, '-', '_' and '.'."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower()).strip("-.")
    return cleaned or "phi3-lora"
