"""Export: the zip bundle, the merged 16-bit model, and Hub pushes that fail with a message."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.training import write_rows
from phi3_lora import export, train
from phi3_lora.config import RunConfig
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_phi3_dir):
    tmp = tmp_path_factory.mktemp("export")
    write_rows(tmp / "d.jsonl", n=8, question="hi {i}", answer="Quillon here.")
    cfg = RunConfig().replace(model={"name": str(tiny_phi3_dir), "load_in_4bit": False},
                              train={"max_steps": 2, "learning_rate": 5e-2, "max_length": 32},
                              data={"source": str(tmp / "d.jsonl"), "eval_fraction": 0.0})
    train.run(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_zip_holds_safetensors_config_template_and_a_model_card(run_dir, tmp_path):
    path = export.adapter_zip(run_dir, tmp_path)
    with zipfile.ZipFile(path) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
        card = zf.read(next(n for n in zf.namelist() if n.endswith("README.md"))).decode()
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "README.md",
            "run_summary.json", RunDir.CONFIG} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert "PeftModel.from_pretrained" in card and "final_loss" in card and "learning_rate" in card


@pytest.mark.slow
def test_zip_names_no_path_of_this_machine_and_still_verifies(run_dir, tmp_path, tiny_phi3_dir):
    """Anybody may download the zip: the base model folder and the data file are named by their names (config,
    summary, adapter_config.json, card), and the fresh process that verifies it finds the base by that name, as a
    user with a copy of it beside them would."""
    from phi3_lora import verify

    path = export.adapter_zip(run_dir, tmp_path)
    with zipfile.ZipFile(path) as zf:
        texts = {n: zf.read(n).decode("utf-8", "replace") for n in zf.namelist() if not n.endswith(".safetensors")}
    leaks = {n: folder for n, text in texts.items() for folder in (str(run_dir.parent), str(tiny_phi3_dir),
                                                                    str(tiny_phi3_dir.parent)) if folder in text}
    assert not leaks, leaks
    assert verify.load(path).ok, verify.load(path).line()
    assert f"on base {tiny_phi3_dir.name}" in verify.load(path).loaded
    again = export.adapter_zip(run_dir, tmp_path, verify=True)  # nothing changed: the verification is reused
    assert verify.sidecar(again).stat().st_mtime_ns == verify.sidecar(path).stat().st_mtime_ns


@pytest.mark.slow
def test_a_failed_verification_names_no_path_of_this_machine(tmp_path):
    """The last line of a verifying child's stderr goes into the card and onto the page: the paths in it are shown
    by their names (here: peft cannot find the base folder that adapter_config.json names)."""
    from phi3_lora import verify

    secret = tmp_path / "owners-secret-folder" / "base-model"
    folder = tmp_path / "bundle" / "run"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": str(secret), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
        "lora_alpha": 4, "target_modules": ["q_proj"]}))
    ref = verify.Reference([[{"role": "user", "content": "hi"}]], ["x"], [[1]], [2], 2, "float32", "cpu", None,
                           "probe")
    result = verify.verify_export(folder, "adapter", ref, timeout_s=300)
    assert result.error and "could not load the export" in result.error, result
    assert "owners-secret-folder" not in result.error and str(tmp_path) not in result.error, result.error


@pytest.mark.slow
def test_merged_model_reloads_stock_and_matches_base_plus_adapter(run_dir, tmp_path, tiny_phi3_dir):
    merged_dir = export.merge_adapter(run_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").exists() and not list(merged_dir.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(RunDir(run_dir).adapter))
    assert merged.config.model_type == "phi3" and next(merged.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 450, 3681, 338, 263, 1243]])
    with torch.no_grad():
        with_adapter = tuned(ids).logits
        with tuned.disable_adapter():
            without = tuned(ids).logits
        got = merged(ids).logits
    # The merged file is 16-bit, so it differs from fp32 base+adapter by bf16 rounding of the weights;
    # that must be far smaller than what the adapter changes.
    assert (got - with_adapter).abs().max() < 0.2 * (with_adapter - without).abs().max()
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] in ("bfloat16", "float16")


@pytest.mark.slow
def test_push_without_a_token_says_where_to_get_one(run_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no saved login either
    with pytest.raises(UserError, match="No Hugging Face token"):
        export.push_to_hub(run_dir, "me/my-adapter", token=None)


@pytest.mark.slow
def test_push_offline_is_a_clear_error_and_keeps_the_adapter(run_dir):
    with pytest.raises(UserError, match="Could not push to the Hub"):
        export.push_to_hub(run_dir, "me/my-adapter", token="hf_fake")
    assert RunDir(run_dir).has_adapter()
    assert not (run_dir / "push").exists()  # the Hub is asked first: no minutes of bundling and verifying for it


@pytest.mark.slow
def test_bad_repo_id_is_refused(run_dir):
    with pytest.raises(UserError, match="your-name/model-name"):
        export.push_to_hub(run_dir, "no-slash", token="hf_fake")


# --- merged exports never take a run file's name, and a failed merge leaves no temp (issue 13 item 8) ----------

@pytest.mark.parametrize("name", sorted(RunDir.reserved_names()))
def test_the_app_refuses_a_merge_named_like_a_run_file(name, tmp_path):
    from phi3_lora.ui.export_tab import merge_destination

    with pytest.raises(UserError, match="not a usable folder name"):
        merge_destination(tmp_path / "run", name)


@pytest.mark.slow
def test_merge_onto_a_run_file_is_refused_before_any_work(run_dir):
    run = RunDir(run_dir)
    before = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}
    for target in (run.log, run.config, run.events, run.adapter, run.checkpoints, run.checkpoint(2),
                    run.adapter / "merged", run.path):
        with pytest.raises(UserError, match="Cannot save a merged model"):
            export.merge_adapter(run_dir, target)
    assert {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()} == before  # nothing written, no temp


@pytest.mark.slow
def test_a_merge_that_fills_the_disk_removes_its_temp_folder(run_dir, tiny_disk):
    disk = tiny_disk("2m")  # the tiny model's 16-bit weights alone are ~8 MB
    with pytest.raises(UserError, match="Not enough disk space"):
        export.merge_adapter(run_dir, disk / "merged")
    assert list(disk.iterdir()) == [], "a failed merge left its files behind"


def test_write_zip_is_all_or_nothing(tmp_path: Path) -> None:
    """archive.write_zip (the adapter bundle's and the app's downloads'): the zip holds what it was given; a failure
    part way leaves neither the zip nor its temporary file, and an older zip of that name stays whole."""
    import zipfile

    from phi3_lora.archive import folder_entries, write_zip

    folder = tmp_path / "merged"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "verification.json").write_text("quotes rows")
    dest = write_zip(tmp_path / "out" / "m.zip",
                     [*folder_entries(folder, leave_out=frozenset({"verification.json"})), ("merged/c.md", "card")])
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == ["merged/a.json", "merged/sub/b.txt", "merged/c.md"] and zf.read("merged/c.md") == b"card"

    def broken():
        yield "x.txt", "x"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_zip(dest, broken())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.zip"]
    with zipfile.ZipFile(dest) as zf:
        assert "merged/c.md" in zf.namelist()


def test_export_verification_answers_the_prompts_scoring_answers(tmp_path):
    """verify.held_out_prompts takes each held-out row's prompt from evaluate.row_prompt: the system prompt and
    every turn before the last answer, as scoring and Compare's held-out example use (it once cut at the first
    answer, so a multi-turn row was verified on a different prompt than it was scored on)."""
    from phi3_lora import verify
    from phi3_lora.evaluate import row_prompt

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("{}", encoding="utf-8")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]},
            {"messages": [{"role": "user", "content": "no answer here"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    run.eval_rows.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    prompts, source = verify.held_out_prompts(run.path / "adapter")
    assert source == "held-out"
    assert prompts == [row_prompt(rows[0]["messages"])[0], row_prompt(rows[2]["messages"])[0]]
    assert prompts[0][-1] == {"role": "user", "content": "Capital of France?"} and len(prompts[0]) == 4
