"""README's "The LoRA guide's workflow in Python" block runs as written, on a tiny Phi-3."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## The LoRA guide's workflow in Python"


def guide_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_phi3_lora_stays_light_and_exports_the_guide_api() -> None:
    import subprocess
    import sys

    code = ("import sys, phi3_lora; assert 'torch' not in sys.modules; "
            "assert callable(phi3_lora.load_lora) and phi3_lora.finetune.__module__ == 'phi3_lora.guide'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=README.parent)
    import phi3_lora

    with pytest.raises(AttributeError):
        phi3_lora.no_such_thing  # noqa: B018


@pytest.mark.slow
def test_readme_guide_section_runs_on_tiny_phi3(tmp_path: Path, tiny_phi3_dir: Path, capsys) -> None:
    code = guide_block()
    for name, value in (("MODEL", str(tiny_phi3_dir)), ("DATA", str(README.parent / "data" / "sample_chat.jsonl")),
                        ("RUN_DIR", str(tmp_path / "run"))):
        code, n = re.subn(rf'^{name} = ".*"$', f"{name} = {value!r}", code, flags=re.M)
        assert n == 1, name
    namespace: dict = {}
    exec(compile(code, str(README) + ":guide", "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert result.status == "finished" and result.adapter_dir.is_dir()
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    assert not any(p.requires_grad for p in namespace["again"].parameters())
    trainable = namespace["fresh"].get_nb_trainable_parameters()[0]
    assert trainable == 2 * 2 * 16 * (64 + 64)  # 2 layers x {q, v} x r x (in + out)
    assert "trainable params" in capsys.readouterr().out
