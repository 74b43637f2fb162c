"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Two pytest-xdist workers share the 2 cores with the processes they start (apps, training runs, chromium):
# torch's OpenMP threads that spin while waiting stall every kernel of a process whose partner thread is
# descheduled (phi3_lora.threads). Passive waiting keeps the thread counts and lets the other process run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Compare's compiled pair step (on by default in the app) compiles for minutes on 2 cores: off for the suite, except
# in the tests that test it (they set PHI3_LORA_COMPILED_PAIR=1 themselves)
os.environ.setdefault("PHI3_LORA_COMPILED_PAIR", "0")

import subprocess
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
PHI3_TOKENIZER_GGUF = ASSETS / "ggml-vocab-phi-3.gguf"


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Phi3ForCausalLM (hidden 64, ~4.2M params, fused qkv_proj / gate_up_proj) with the real
    Phi-3 tokenizer (32064 tokens, <|end|>) and trl's Phi-3 training template, saved as a plain
    from_pretrained folder. Built once per session (~5 s); pass it as ModelSettings(name=str(tiny_phi3_dir))."""
    from helpers.tiny_models import build_tiny_phi3
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny_phi3"), PHI3_TOKENIZER_GGUF)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder in the phi3_lora cache ($PHI3_LORA_CACHE or
    ~/.cache/phi3_lora). The first call on a machine converts the GGUF (~20 s); later sessions reuse it."""
    from phi3_lora.embedded import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64, ~3.3M params, separate q/k/v and gate/up, tied embeddings)
    with the SmolLM2 tokenizer and its own ChatML template (49152 tokens, <|im_end|>; load_tokenizer gives it
    phi3_lora's chatml_training.jinja). Read from the embedded GGUF, so it needs no conversion; ~5 s per session."""
    from helpers.tiny_models import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2ForCausalLM (hidden 64, q/k/v biases, 4 heads / 2 kv heads, tied embeddings) with the
    SmolLM2 tokenizer and Qwen2.5's own chat template (default system prompt, <|im_end|>); ~5 s per session."""
    from helpers.tiny_models import build_tiny_qwen2
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real small filesystem (tmpfs, needs root); yields a function mounting one of a given size."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def train_hooks(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Child processes started by the test load tests/helpers/train_hooks/sitecustomize.py, whose environment
    variables (SLOW_SAVE_ENV, MEMORY_LIMIT_ENV, STEP_ENV, SAVE_ENV) inject test-only faults and slowness into
    the training loop."""
    plugin = Path(__file__).parent / "helpers" / "train_hooks"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")])))
    return plugin


SAMPLE_CHAT = Path(__file__).resolve().parent.parent / "data" / "sample_chat.jsonl"
EMBEDDED_EVAL_TOKENS = 32  # embedded_sample_run's answer length in its end-of-run scoring


@pytest.fixture(scope="session")
def embedded_sample_run(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    """One short LoRA run of the embedded SmolLM2 on data/sample_chat.jsonl (quick-cpu, 16 steps, 10% held out),
    shared by the slow tests that need a really tuned model; it scores its held-out answers when it ends
    (train.eval_answers), so runs/<id>/eval/ holds one result. Lives in its own runs folder. The scoring answers
    are EMBEDDED_EVAL_TOKENS long, not 128: the tuned answers end by ~10 tokens, the base's ran on to 128 (most of
    the scoring's time), and the tuned lead stays wide (rougeL 62 vs 10 at 32 tokens, 62 vs 6 at 128)."""
    from phi3_lora import config, train

    cfg = config.preset("quick-cpu").replace(data={"source": str(SAMPLE_CHAT), "eval_fraction": 0.1},
                                             train={"max_steps": 16, "save_steps": 100,
                                                    "eval_answers_max_new_tokens": EMBEDDED_EVAL_TOKENS})
    run_dir = tmp_path_factory.mktemp("embedded_runs") / "20260101-000000-sample"
    result = train.run(cfg, run_dir)
    assert result.status == "finished" and result.eval_loss is not None
    return run_dir


@pytest.fixture(scope="module")
def browser():
    """A headless chromium (tests/helpers/browser.py), one per test module."""
    from helpers.browser import launch_browser

    yield from launch_browser()


# --- pytest-xdist (README's `-n 2 --dist loadfile`) -------------------------------------------------------------
# One mechanism, on the controller: the scheduler below hands out whole units (a file, or the files of a shared unit)
# costliest first. A file runs whole on one worker, so a module's app server, browser and trained runs are made once.
# The files that read embedded_sample_run (a 16-step SmolLM2 run, a minute of both cores) are one unit: a session
# fixture is made once per worker. The costliest units go first, so the last minutes are not one long file running
# alone; a unit not listed keeps its collection order after them. tests/test_suite_order.py fails on a name here
# that is no longer a file in tests/ (a rename would silently drop it to the back).
SHARED_UNITS = {name: "embedded_sample_run" for name in
                ("test_browser_evaluate.py", "test_evaluate_embedded.py", "test_learns_a_fact.py")}
# By each unit's summed test time in a whole-suite run (--junitxml, 2026-12-05): every unit over ~60 s is placed, so
# no long one (test_pair_graph's two compiles were unlisted and ran near the end) can start last.
COSTLIEST_FIRST = ("test_browser.py", "embedded_sample_run", "test_gguf.py", "test_pair_graph.py", "test_jobs.py",
                   "test_faithful_export.py", "test_bounds.py", "test_spaces.py", "test_busy_runs.py",
                   "test_faults.py", "test_access.py", "test_credentials.py", "test_app_api.py", "test_quotas.py",
                   "test_ui_walk.py", "test_faithful.py", "test_export.py", "test_app_bad_inputs.py", "test_login.py",
                   "test_call_rate.py", "test_lean_lora.py", "test_deferred_metrics.py", "test_exposure.py",
                   "test_cpu_ceiling.py", "test_multi_gpu.py")


def work_unit(nodeid: str) -> str:
    """The unit a test is scheduled with: its file's name, or the shared unit that file belongs to."""
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SHARED_UNITS.get(file, file)


def unit_rank(unit: str) -> int:
    """Where a unit goes: its place in COSTLIEST_FIRST, or after all of them."""
    return COSTLIEST_FIRST.index(unit) if unit in COSTLIEST_FIRST else len(COSTLIEST_FIRST)


@pytest.hookimpl(optionalhook=True)  # a plain `pytest`, or one without xdist installed, runs in pytest's own order
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadfile with the embedded_sample_run files as one unit and the units costliest first (xdist's own
    loadgroup cannot group them under pytest 9: it renames node ids through an attribute pytest no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist would put the units with the most tests first instead

    class CostliestFirst(LoadScopeScheduling):
        ranked = False

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            # schedule() fills the work queue in collection order and then assigns: order it before the first unit
            # goes out (a stable sort: the units not listed keep their order)
            if not self.ranked:
                ranked = sorted(self.workqueue.items(), key=lambda item: unit_rank(item[0]))
                self.workqueue.clear()
                self.workqueue.update(ranked)
                self.ranked = True
            super()._assign_work_unit(node)

    return CostliestFirst(config, log)
