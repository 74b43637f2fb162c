"""Version guards of the speed path: with library versions it was not tested with, each part falls back to the
stock path (peft's forward, plain SDPA, re-quantised 4-bit slices) and one warning per process says so."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import AutoModelForCausalLM

from phi3_lora import fused, lora_attach, options
from phi3_lora.config import LoraSettings, ModelSettings, RunConfig
from phi3_lora.guide import add_lora
from phi3_lora.models import load_model
from phi3_lora.speed import bnb_codes, lean_lora, packed_attention, versions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def untested_libraries(monkeypatch: pytest.MonkeyPatch):
    """Installed versions reported as ones nobody tested (the guards' input), the warning cache cleared."""
    versions.untested.cache_clear()
    monkeypatch.setattr(versions, "installed", lambda dist: "0.0.1")
    yield
    versions.untested.cache_clear()


def test_the_installed_pins_are_the_tested_versions() -> None:
    versions.untested.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.untested() == {}
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    checked = {d: spec for d, spec in versions.TESTED.items() if d in pins}
    assert set(checked) >= {"torch", "peft", "transformers", "bitsandbytes"}
    assert all(Version(pins[d].strip()) in SpecifierSet(spec) for d, spec in checked.items())  # the pins are tested
    assert {d for deps in versions.NEEDS.values() for d in deps} <= set(versions.TESTED)  # each declared once


def test_untested_versions_fall_back_with_one_warning(untested_libraries, tiny_phi3_dir: Path) -> None:
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_phi3_dir), LoraSettings(r=4))
    with pytest.warns(RuntimeWarning, match="stock path") as caught:
        assert lean_lora.install(model) == 0  # peft's forward stays
        assert not packed_attention.cuda_varlen_available()
        assert not versions.tested("fused_4bit_codes")
    assert len(caught) == 1 and all(s in str(caught[0].message) for s in ("peft's own LoRA forward", "0.0.1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not versions.tested("lean_lora")


def test_a_training_run_with_an_untested_peft_takes_peft_forward_and_warns_once(monkeypatch, tiny_phi3_dir: Path):
    """The tested peft version declared as another one than the installed: the run's own LoRA set-up
    (train.attach_lora, lean_lora on) leaves peft's forward on every layer, and says so once."""
    versions.untested.cache_clear()
    monkeypatch.setitem(versions.TESTED, "peft", "==0.0.1")
    config = RunConfig().replace(model={"name": str(tiny_phi3_dir), "load_in_4bit": False})
    opts = options.resolve_options(config, "cpu", "float32", liger_installed=False)
    assert opts.lean_lora
    try:
        with pytest.warns(RuntimeWarning) as caught:
            first = lora_attach.attach_lora(load_model(config.model, device="cpu"), config, opts)
            second = lora_attach.attach_lora(load_model(config.model, device="cpu"), config, opts)
    finally:
        versions.untested.cache_clear()
    speed_warnings = [w for w in caught if "stock path" in str(w.message)]
    assert len(speed_warnings) == 1
    assert "peft's own LoRA forward" in str(speed_warnings[0].message) and "==0.0.1" in str(speed_warnings[0].message)
    for model in (first, second):
        layers = [m for m in model.modules() if isinstance(m, lean_lora.lora_linear_classes())]
        assert layers and not any(hasattr(m, lean_lora._ORIGINAL) for m in layers)  # the stock forward ran


def test_untested_bitsandbytes_requantises_4bit_slices(untested_libraries, tiny_phi3_dir: Path) -> None:
    from phi3_lora import models

    with pytest.warns(RuntimeWarning):
        model = models.load_model(ModelSettings(name=str(tiny_phi3_dir), load_in_4bit=True, dtype="float32"),
                                  device="cpu").eval()
        linear = model.model.layers[0].self_attn.qkv_proj
        assert bnb_codes.codes_4bit(linear) is None  # the private QuantState path is not touched
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
        fused.split_fused_layers(model, ["qkv_proj"])
        after = model(ids).logits
    assert type(model.model.layers[0].self_attn.qkv_proj.q_proj).__name__ == "Linear4bit"
    assert (after - before).abs().max() <= 0.01 * before.abs().max()  # re-quantised: close, not bit-identical


def test_bench_command_runs_the_checkouts_bench_without_touching_sys_path(tmp_path: Path) -> None:
    """From outside the checkout, `python -m phi3_lora bench --help` reaches bench/train_speed.py's own parser
    (run as a child from the checkout root) and the CLI's sys.path stays the interpreter's own."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "phi3_lora").symlink_to(ROOT / "phi3_lora")
    code = ("import sys; before = list(sys.path); from phi3_lora import cli; code = cli.main(['bench', '--help']); "
            "assert sys.path == before, sys.path; sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path / "pkg"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "--cpu" in out.stdout and "train_speed" in out.stdout, out.stderr[-2000:]
