"""GGUF export: written with the gguf package, read back by transformers' GGUF loader in a fresh process,
for both architectures (Phi-3 with fused layers and the real Phi-3 tokenizer; Llama with the SmolLM2 tokenizer),
f16 and q8_0; the Ollama template measured from the chat template; unsupported architectures refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers.training import write_rows
from phi3_lora import export, gguf_bundle, gguf_export, ollama, train
from phi3_lora.config import RunConfig
from phi3_lora.errors import UserError
from phi3_lora.gguf_verify import Q8_ARGMAX_AGREEMENT, judge
from phi3_lora.threads import THREADS_ENV

# Where two verification processes run side by side, each generates with one thread: two processes of two OpenMP
# threads on this 2-core machine stall each other's every kernel (phi3_lora.threads measured it); the load average
# the product's own rule reads lags behind two children that start together (so the tests set THREADS_ENV).

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And {{ 3+3 }}?"}],
]


def _trained_run(tmp, model_dir):
    # float32 on every CPU: with `dtype auto` a CPU with native bf16 trains in bf16, and 8 steps at 5e-2 took the
    # tiny Llama's weights to ~10x their initial scale, a model so chaotic that q8_0's 0.4% weight noise moved its
    # logits by 97% of their scale (argmax agreement 76.6%, a true "NOT verified"); float32 training on the same
    # machine gives a model whose q8_0 export agrees 100%. The export is under test here, not the training dtype.
    write_rows(tmp / "d.jsonl", n=10, question="Who are you, friend {i}?", answer="Quillon here.")
    cfg = RunConfig().replace(model={"name": str(model_dir), "load_in_4bit": False, "dtype": "float32"},
                              train={"max_steps": 8, "learning_rate": 5e-2, "max_length": 96, "eval_answers": False},
                              data={"source": str(tmp / "d.jsonl"), "eval_fraction": 0.2})
    train.run(cfg, tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def phi3_run(tmp_path_factory, tiny_phi3_dir):
    tmp = tmp_path_factory.mktemp("gguf_phi3")
    run = _trained_run(tmp, tiny_phi3_dir)
    return run, export.merge_adapter(run, tmp / "merged", verify=False)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("gguf_llama")
    run = _trained_run(tmp, tiny_llama_dir)
    return run, export.merge_adapter(run, tmp / "merged", verify=False)


def _metadata(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre", "_id", "add_bos_token"))}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.fixture(scope="module")
def phi3_exports(phi3_run, tmp_path_factory):
    """Both types exported and verified at once (each verification is a fresh process busy on about one core)."""
    run, merged = phi3_run

    def export_one(gguf_type):
        return gguf_bundle.export_gguf(run, tmp_path_factory.mktemp(f"gguf_{gguf_type}") / "gguf", gguf_type,
                                       merged_dir=merged)

    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(max_workers=2) as pool:
        env.setenv(THREADS_ENV, "1")
        return dict(zip(("f16", "q8_0"), pool.map(export_one, ("f16", "q8_0"))))


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_phi3_round_trip(phi3_run, phi3_exports, gguf_type):
    run, merged = phi3_run
    result = phi3_exports[gguf_type]
    check = result.check
    print(f"phi3 {gguf_type}: {result.size_bytes} bytes; {check.summary()}")
    assert check.passed, check.summary()
    assert check.prompts == 2 and check.prompt_source == "2 held-out prompts"
    assert check.same_prompt_tokens == check.prompts  # tokenizer + chat template survive the trip
    if gguf_type == "f16":
        assert check.same_answers == check.prompts and check.max_logit_diff <= check.logit_scale * 2 ** -7
    else:
        assert check.argmax_agreement >= Q8_ARGMAX_AGREEMENT
    meta, tensors = _metadata(result.gguf)
    assert meta["general.architecture"] == "phi3" and meta["tokenizer.ggml.model"] == "llama"
    assert tensors["blk.0.attn_qkv.weight"] == gguf_type.upper() and tensors["blk.0.ffn_up.weight"] == gguf_type.upper()
    assert tensors["blk.0.attn_norm.weight"] == "F32" and "output.weight" in tensors  # Phi-3 is untied
    template = meta["tokenizer.chat_template"]
    assert "<|assistant|>" in template and not re.search(r"\{%-?\s*(end)?generation", template)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    modelfile = (result.folder / "Modelfile").read_text()
    assert f"FROM ./{result.gguf.name}" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    assert "ollama create run -f Modelfile" in result.commands["Ollama"]
    assert json.loads((result.folder / "verification.json").read_text())["passed"] is True


@pytest.mark.slow
def test_llama_round_trip_through_the_cli(llama_run, tmp_path, monkeypatch):
    """`python -m phi3_lora export --gguf OUT --gguf-type q8_0`, as a user types it; then f16 from the library."""
    run, merged = llama_run
    monkeypatch.setenv(THREADS_ENV, "1")
    out = tmp_path / "cli"
    # The CLI (its own merge, write and verification process) and the library's f16 export run side by side: each
    # is mostly one busy core (loading, GGUF parsing), and they share only the read-only run folder.
    logs = {name: open(tmp_path / f"cli.{name}", "w+") for name in ("stdout", "stderr")}  # no pipe to fill up
    cli = subprocess.Popen([sys.executable, "-m", "phi3_lora", "export", "--adapter", str(run), "--gguf", str(out),
                            "--gguf-type", "q8_0"], stdout=logs["stdout"], stderr=logs["stderr"], text=True)
    try:
        f16 = gguf_bundle.export_gguf(run, tmp_path / "f16", "f16", merged_dir=merged)
        cli.wait(timeout=1200)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for log in logs.values():
            log.close()
    done = subprocess.CompletedProcess(cli.args, cli.returncode, *(
        (tmp_path / f"cli.{name}").read_text() for name in ("stdout", "stderr")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified: " in done.stdout and "ollama create run -f Modelfile" in done.stdout
    q8 = json.loads((out / "verification.json").read_text())
    meta, tensors = _metadata(out / "run-q8_0.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert tensors["blk.0.attn_q.weight"] == "Q8_0" and "output.weight" not in tensors  # tied embeddings
    assert q8["argmax_agreement"] >= Q8_ARGMAX_AGREEMENT and q8["same_prompt_tokens"] == q8["prompts"]

    print(f"llama q8_0: {(out / 'run-q8_0.gguf').stat().st_size} bytes, argmax {q8['argmax_agreement']:.3f}; "
          f"f16: {f16.size_bytes} bytes; {f16.check.summary()}")
    assert f16.check.passed and f16.check.same_answers == f16.check.prompts
    assert 'PARAMETER stop "<|im_end|>"' in (f16.folder / "Modelfile").read_text()


def test_rope_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    for heads, kv in ((4, 4), (8, 4)):
        back = LlamaTensorProcessor()._reverse_permute_weights(gguf_export.permute_rope(weights, heads, kv), heads, kv)
        assert np.array_equal(back, weights)
        assert not np.array_equal(gguf_export.permute_rope(weights, heads, kv), weights)


def test_unsupported_architecture_is_refused_by_name():
    with pytest.raises(UserError, match="'gpt2'.*llama.*phi3"):
        gguf_export.check_architecture({"model_type": "gpt2"})
    with pytest.raises(UserError, match="yarn"):
        gguf_export.check_architecture({"model_type": "llama", "rope_parameters": {"rope_type": "yarn"}})


def test_unsupported_model_is_refused_before_merging(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(base)
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="does not support the 'gpt2' architecture"):
        gguf_bundle.export_gguf(tmp_path / "run", tmp_path / "out")


@pytest.mark.parametrize("fixture", ["tiny_phi3_dir", "tiny_llama_dir"])
def test_ollama_template_renders_like_the_chat_template(fixture, request):
    from phi3_lora.models import load_tokenizer

    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)))
    template = gguf_export.strip_generation_markers(tokenizer.chat_template)
    render = lambda m: tokenizer.apply_chat_template(m, chat_template=template, tokenize=False,  # noqa: E731
                                                     add_generation_prompt=True)
    pieces = ollama.template_pieces(render, tuple(tokenizer.all_special_tokens))
    for messages in CONVERSATIONS:
        assert ollama.render_pieces(pieces, messages) == render(messages)
    go = ollama.go_template(pieces)
    assert '{{ "{{" }}' not in go and "{{ .Content }}" in go and "{{-" not in go
    assert pieces.user_prefix in ("<|user|>\n", "<|im_start|>user\n")


@pytest.mark.slow
def test_embedded_smollm2_round_trip(embedded_dir, tmp_path, monkeypatch):
    """The embedded 135M SmolLM2 (Llama architecture, byte-level BPE 'smollm') as f16 and q8_0."""
    from phi3_lora.embedded import EMBEDDED_NAME

    monkeypatch.setenv(THREADS_ENV, "1")

    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Write one sentence about cats."}]]
    pre = gguf_bundle.embedded_pre(EMBEDDED_NAME)
    assert pre == "smollm"

    def bundle(gguf_type):
        return gguf_bundle.bundle_from_merged(embedded_dir, tmp_path / gguf_type, gguf_type, name="smollm2",
                                              prompts=prompts, prompt_source="2 prompts", pre=pre)

    # Both types at once: each verification is a fresh process that spends most of its time on one core
    # (transformers' GGUF loader parsing the 49k-token vocabulary in Python), so two of them share 2 cores well.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(("f16", "q8_0"), pool.map(bundle, ("f16", "q8_0"))))
    for gguf_type, result in results.items():
        print(f"SmolLM2-135M {gguf_type}: {result.size_bytes / 2**20:.1f} MiB; {result.check.summary()}")
        assert result.check.passed, result.check.summary()
        meta, _ = _metadata(result.gguf)
        assert meta["tokenizer.ggml.pre"] == "smollm"


def test_a_reader_that_tokenizes_otherwise_is_named_with_what_to_do():
    """Weights that match along the merged model's tokens, prompts tokenized otherwise (transformers 5.17's GGUF
    reader drops a Llama vocabulary's spaces): NOT verified, and the summary says which reader and what to do."""
    row = {"prompt": "Say hello", "same_answer": False, "merged_answer": "Hi", "gguf_answer": "Ho", "positions": 4,
           "argmax_agree": 4, "max_logit_diff": 0.0, "logit_scale": 9.0, "same_prompt_tokens": False,
           "token_example": {"merged": ["<|user|>", "▁", "<0x0A>", "S", "ay", "▁hello"],
                             "gguf": ["<|user|>", "S", "ay", "hello"]}}
    check = judge({"rows": [row], "transformers": "5.17.0"}, "f16", "1 held-out prompt")
    assert not check.passed and check.weights_match
    text = check.summary()
    assert text.startswith("NOT verified") and "transformers 5.17.0's GGUF reader" in text
    assert "merged: <|user|> ▁ <0x0A> S ay ▁hello" in text and "gguf: <|user|> S ay hello" in text
    assert "requirements.txt" in text
    wrong_weights = judge({"rows": [dict(row, max_logit_diff=3.0)], "transformers": "5.17.0"}, "f16", "1")
    assert not wrong_weights.passed and not wrong_weights.weights_match and wrong_weights.reader_hint() == ""
    same_tokens = judge({"rows": [dict(row, same_prompt_tokens=True, same_answer=True, token_example={})]}, "f16", "1")
    assert same_tokens.passed and same_tokens.reader_hint() == "" and "GGUF reader" not in same_tokens.summary()


def test_what_a_killed_export_left_in_its_folder_is_removed_and_a_live_ones_kept(tmp_path):
    """A killed export (an app that crashed, a CLI killed with SIGKILL) leaves its temporary merge and half-written
    GGUF in the export folder, where they would count on somebody's share and go into its download for good: the
    next export into the folder removes what a dead process left, never a live export's files nor the user's own."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as dead:
        dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "gguf-f16"
        merging = f"..merged-tmp-{dead.pid}.tmp-{dead.pid}-139871"  # merge_adapter's: runs.temporary_of, pid and thread
        for name in (f".merged-tmp-{dead.pid}", merging, f".merged-tmp-{live.pid}"):
            (folder / name).mkdir(parents=True)
            (folder / name / "model.safetensors").write_bytes(b"x")
        (folder / f".run-f16.gguf.tmp-{dead.pid}").write_bytes(b"x")
        (folder / "run-f16.gguf").write_bytes(b"x")
        (folder / ".notes").write_text("mine")
        removed = gguf_bundle.remove_stale_temporaries(folder)
        assert sorted(p.name for p in removed) == sorted([f".merged-tmp-{dead.pid}", merging,
                                                          f".run-f16.gguf.tmp-{dead.pid}"])
        assert sorted(p.name for p in folder.iterdir()) == [".merged-tmp-" + str(live.pid), ".notes", "run-f16.gguf"]
    finally:
        live.kill()
        live.wait()


def test_the_app_removes_at_its_start_what_a_killed_gguf_export_left(tmp_path, tiny_llama_dir):
    """An app stopped or crashed mid-export leaves a whole temporary 16-bit merge in the run's export folder, counted
    on the exporter's share and zipped into that folder's next download: the app removes it when it starts (it stayed
    until somebody exported into the same folder again); a GGUF and the run's own files stay."""
    from helpers.run_folders import make_adapter_run
    from phi3_lora.ui import build_app

    with subprocess.Popen([sys.executable, "-c", "pass"]) as dead:
        dead.wait()
    run = make_adapter_run(tmp_path / "runs", tiny_llama_dir)
    left = run / "gguf-f16" / f".merged-tmp-{dead.pid}"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"x" * 1024)
    (run / "gguf-f16" / "run-f16.gguf").write_bytes(b"x")
    before = sorted(p.relative_to(run) for p in run.rglob("*") if "merged-tmp" not in str(p))
    build_app(tmp_path / "runs", default_model=str(tiny_llama_dir))
    assert not left.exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
