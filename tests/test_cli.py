"""The CLI: generated flags, validation report, and user errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from phi3_lora import cli

ROOT = Path(__file__).resolve().parent.parent


def test_flags_presets_and_yaml_compose(tmp_path, capsys):
    assert cli.main(["train", "--preset", "cookbook", "--data", "d.jsonl", "--train.learning_rate", "1e-4",
                     "--lora.target_modules", "[qkv_proj,o_proj]", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "cookbook" and cfg["train"]["learning_rate"] == 1e-4  # the flag wins over the preset
    assert cfg["train"]["warmup_ratio"] == 0.2 and cfg["lora"]["target_modules"] == ["qkv_proj", "o_proj"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml"), "--train.max_steps", "7",
                     "--print-config"]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again["train"]["max_steps"] == 7 and again["train"]["learning_rate"] == 1e-4


def test_validate_reports_bad_rows_and_a_histogram(tmp_path, capsys, embedded_dir):
    data = tmp_path / "d.jsonl"
    data.write_text((ROOT / "data" / "sample_chat.jsonl").read_text() + '{"messages": [{"role": "user"}]}\n')
    assert cli.main(["validate", str(data), "--stats", "--max-length", "60", "--model",
                     "embedded: SmolLM2-135M-Instruct"]) == 0
    out = capsys.readouterr().out
    assert "48 usable of 49 rows" in out and "line 49" in out
    assert "would be truncated" in out and "> max_length" in out and "#" in out


def test_user_errors_are_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "phi3_lora", "train", "--data", "missing.jsonl",
                           "--train.learning_rate", "7"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "learning_rate" in proc.stderr


def test_help_lists_every_command_and_config_flag():
    top = subprocess.run([sys.executable, "-m", "phi3_lora", "--help"], capture_output=True, text=True, cwd=ROOT)
    for command in ("validate", "train", "compare", "chat", "runs", "stop", "resume", "export", "bench"):
        assert command in top.stdout
    train = subprocess.run([sys.executable, "-m", "phi3_lora", "train", "--help"], capture_output=True, text=True,
                           cwd=ROOT)
    assert "--lora.fused_slices" in train.stdout and "--train.memory_budget_gb" in train.stdout


def test_the_flags_the_app_shows_reproduce_its_run_config(tmp_path, capsys):
    """Settings' "Equivalent CLI" flags, pasted into a shell, give the YAML the app writes: YAML would read the
    embedded model's name as a mapping ('embedded: ...') and a file named 2024 as a number."""
    import shlex

    from phi3_lora import config as cfgmod
    from phi3_lora.ui.settings import cli_text

    config = cfgmod.preset("quick-cpu").replace(
        model={"name": "embedded: SmolLM2-135M-Instruct"}, data={"source": str(tmp_path / "2024")},
        train={"max_steps": 40, "save_steps": 5}, lora={"target_modules": ["q_proj", "v_proj"]})
    command = cli_text(config).split("# the same run as flags\n", 1)[1].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "phi3_lora"] and "embedded: SmolLM2-135M-Instruct" in argv
    assert cli.main([*argv[3:], "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(cfgmod.dump_yaml(config))
    shown.pop("preset", None), expected.pop("preset", None)  # the flags name no preset; every value is the same
    assert shown == expected
    # A YAML string too stays text where the field takes text, and null still empties a field that may be empty.
    assert cli.main(["train", "--data.source", "2024", "--train.eval_steps", "null", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["source"] == "2024" and cfg["train"]["eval_steps"] is None
