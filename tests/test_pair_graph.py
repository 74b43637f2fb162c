"""Compare's compiled pair step (phi3_lora/speed/pair_graph.py) on a real tiny Llama with a real compile: every step's
logits equal the eager pair's bit for bit (float32, as `dtype auto` loads on a CPU without native bf16), with and
without padding, and when one row ends and the other goes on eagerly; and the answers do switch over to it.

The adapter's B is far from zero, so the tuned row answers otherwise than the base row: an update that leaked to
the base row, or attention over another length than the filled one (a StaticCache's whole buffer), changes the
logits and fails these tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3_lora import cpu_linear
from phi3_lora.speed import pair_graph
from phi3_lora.generate import ChatEngine, GenerationSettings

SHORT = [{"role": "user", "content": "Name three colours of the sea."}]
LONG = [{"role": "system", "content": "Answer briefly, in one sentence."},
        {"role": "user", "content": "Why is the sky blue on a clear day, and red at sunset?"}]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory) -> ChatEngine:
    from helpers.tiny_models import save_strong_adapter

    from phi3_lora.config import ModelSettings

    adapter = save_strong_adapter(tiny_llama_dir, tmp_path_factory.mktemp("graph_adapter") / "adapter")
    name = str(tiny_llama_dir)
    engine = ChatEngine(name, adapter, model_settings=ModelSettings(name=name, dtype="float32", load_in_4bit=False))
    if not cpu_linear.available(engine.model):
        pytest.skip("no oneDNN packed products on this machine: the compiled pair step is not offered")
    return engine


@pytest.fixture(scope="module")
def compiled(engine, tmp_path_factory):
    """The engine's pair step, compiled once for the module in a child process (a minute or so on the tiny model),
    into an inductor cache and a phi3_lora cache (where the step's package goes) of the module's own."""
    import torch

    from phi3_lora.threads import THREADS_ENV

    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
    mp.setenv("PHI3_LORA_CACHE", str(tmp_path_factory.mktemp("phi3_lora_cache")))
    mp.setenv(pair_graph.ENV, "1")
    # the compiled step holds for the thread count it compiled at (dynamo guards it); a loaded machine would give
    # the answers 1 thread (threads.generation_threads) and the step would hand over to eager on every answer
    mp.setenv(THREADS_ENV, str(torch.get_num_threads()))
    try:
        engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))  # starts the background compile
        assert engine._compiled_pair.wait(timeout=900), engine._compiled_pair.failed
        assert engine._compiled_pair.built  # compiled (in a child process), not found in a cache
        yield engine._compiled_pair
    finally:
        mp.undo()


class _Logits:
    """A StoppingCriteria that keeps each step's logits and ends the live row `end_row` after `end_after` steps."""

    def __init__(self, end_after: int | None = None, end_row: int = 1) -> None:
        self.steps: list = []
        self.end_after, self.end_row = end_after, end_row

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps.append(scores.clone())
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.end_after is not None and len(self.steps) == self.end_after:
            ended[self.end_row] = True
        return ended


def _both(engine, monkeypatch, run) -> tuple:
    monkeypatch.setenv(pair_graph.ENV, "0")
    eager = run()
    monkeypatch.setenv(pair_graph.ENV, "1")
    return eager, run()


def _assert_same_steps(eager: list, fast: list) -> None:
    import torch

    assert len(eager) == len(fast)
    for step, (a, b) in enumerate(zip(eager, fast)):
        assert torch.equal(a, b), f"step {step}: logits differ by {(a - b).abs().max().item()}"


def test_the_compiled_pair_gives_the_eager_logits_and_is_used_once_ready(engine, compiled, monkeypatch):
    import torch

    def run():
        record = _Logits()
        return engine.answer_pairs([LONG], GenerationSettings(max_new_tokens=16), [record]), record.steps

    served = compiled.served
    (eager_answers, eager_steps), (answers, steps) = _both(engine, monkeypatch, run)
    assert compiled.served == served + 1, compiled.failed  # the second run switched over to the compiled step
    _assert_same_steps(eager_steps, steps)
    assert answers == eager_answers
    assert not torch.equal(steps[-1][0], steps[-1][1])  # the rows differ: the base row has no update of its own


def test_rms_norm_and_silu_are_fused_where_atens_order_checks_out(compiled):
    """Those logits above came from inductor's own RMSNorm / SiLU kernels (aten_order), not the opaque eager ops,
    wherever inductor vectorises as ATen does (AVX2, AVX-512)."""
    from phi3_lora.speed import aten_order

    if aten_order.lanes() is None:
        pytest.skip("inductor does not vectorise with ATen's width here: the opaque ops stay")
    import json

    from phi3_lora.speed import pair_artifact

    meta = json.loads((compiled.package.parent / pair_artifact.META).read_text())  # what the compiler process used
    assert meta["width"] == aten_order.lanes()


@pytest.mark.parametrize("end_row", [1, 0])
def test_the_package_serves_the_longer_answer_to_its_end(engine, compiled, monkeypatch, end_row):
    """Base and tuned histories of different lengths (left padding: attention gets a mask), one row ending at step
    5 (the tuned row, as its answers usually end first, or the base row): the other row's answer is token for token
    the eager one (where the ended row leaves the batch), and every step after the prompt ran in the package, the
    ended row riding along frozen (the other row fell back to eager alone before)."""
    import torch

    from phi3_lora.decoding import BASE
    from phi3_lora.merging import TUNED

    def run():
        record = _Logits(end_after=5, end_row=end_row)
        rows = engine.answer_batch([SHORT, LONG], True, GenerationSettings(max_new_tokens=14), [record],
                                   adapter_names=[BASE, TUNED])
        return rows, record.steps

    served, steps_run = compiled.served, compiled.steps
    (eager_rows, eager_steps), (rows, steps) = _both(engine, monkeypatch, run)
    assert compiled.served == served + 1, compiled.failed
    assert rows == eager_rows  # and token for token: the live row's logits below are equal, so its argmaxes
    assert eager_steps[-1].shape[0] == 1 and steps[-1].shape[0] == 2  # eagerly it left the batch; here it stayed
    live = 1 - end_row
    assert len(steps) == len(eager_steps) == 14
    _assert_same_steps(eager_steps[:5], steps[:5])
    # after that the live row's logits come from a 2-row product where eager's came from a 1-row one (oneDNN sums
    # those in another order: ~2e-7 apart here); its tokens, the argmaxes, are the same at every step
    for step, (a, b) in enumerate(zip(eager_steps[5:], steps[5:]), start=5):
        assert torch.allclose(a[0], b[live], rtol=0, atol=1e-5), f"step {step}: {(a[0] - b[live]).abs().max()}"
        assert a[0].argmax() == b[live].argmax(), f"step {step}: another token"
    assert compiled.steps - steps_run == 13  # all but the prompt's step, to the end of the longer answer
    assert not torch.equal(steps[4][0], steps[4][1])


class _EndRow:
    """A StoppingCriteria that ends row `row` after `after` steps (generate hands it no logits when sampling)."""

    def __init__(self, after: int, row: int) -> None:
        self.after, self.row, self.calls = after, row, 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.calls += 1
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        ended[self.row] = self.calls == self.after
        return ended


@pytest.mark.parametrize("end_row", [None, 1])
def test_sampled_answers_run_in_the_package_with_generates_draws(engine, compiled, monkeypatch, end_row):
    """Sampled answers (temperature > 0) come from the package too, drawn as generate draws them: with the same seed
    the answers are generate's (the feature off) token for token, every step after the prompt ran in the package,
    also where one row ends first (generate keeps it in its batch, padded, as the package keeps it frozen), and
    another seed gives other answers."""
    def run(seed):
        stop = [_EndRow(5, end_row)] if end_row is not None else None
        settings = GenerationSettings(temperature=0.9, top_p=0.9, seed=seed, max_new_tokens=14)
        return engine.answer_pairs([LONG], settings, stop)

    steps_run = compiled.steps
    eager, fast = _both(engine, monkeypatch, lambda: run(0))
    assert compiled.steps - steps_run == 13, compiled.failed  # all but the prompt's step
    assert fast == eager
    assert fast != run(1)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_several_prompts_at_once_run_eagerly_once_the_package_is_ready(engine, compiled, monkeypatch, temperature):
    """A batch of more than one pair (scoring answers several held-out rows at once) is not the package's 2-row
    batch: it runs eagerly, with the eager answers, instead of copying 4 rows of keys into the package's 2."""
    settings = GenerationSettings(temperature=temperature, max_new_tokens=6)
    served = compiled.served
    eager, fast = _both(engine, monkeypatch, lambda: engine.answer_pairs([SHORT, LONG], settings))
    assert fast == eager and compiled.served == served and compiled.failed is None


def test_the_step_runs_only_at_the_thread_count_it_was_compiled_at(engine, compiled, monkeypatch):
    """The package runs its loops at the thread count it was compiled at: an answer given another count (a loaded
    machine gives answers 1 thread) runs eagerly without dropping the step, and the next answer at the step's count
    uses it."""
    import os

    from phi3_lora.threads import THREADS_ENV

    if compiled.threads is None or compiled.threads < 2:
        pytest.skip("one CPU thread here: there is no other thread count to answer at")
    assert compiled.threads == int(os.environ[THREADS_ENV])
    monkeypatch.setenv(pair_graph.ENV, "1")
    served, other = compiled.served, compiled.other_threads
    monkeypatch.setenv(THREADS_ENV, "1")
    engine.answer_pairs([LONG], GenerationSettings(max_new_tokens=8))
    assert compiled.served == served and compiled.other_threads > other  # its steps ran eagerly
    assert compiled.ready and compiled.failed is None  # kept, not dropped as a guard miss would
    monkeypatch.setenv(THREADS_ENV, str(compiled.threads))
    engine.answer_pairs([LONG], GenerationSettings(max_new_tokens=8))
    assert compiled.served == served + 1 and compiled.failed is None


def test_another_process_loads_the_package_without_compiling(engine, compiled, tmp_path):
    """An app started again (another process, the same model and adapter, the same phi3_lora cache) loads the
    step's package that `compiled` left there, in seconds, without starting a compiler process, and its steps
    give that process's eager logits bit for bit."""
    import json
    import os
    import subprocess
    import sys

    assert compiled.package is not None and compiled.package.is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(engine.model_name), str(engine.adapter_dir),
                           LONG[1]["content"]], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["built"] is False and out["package"] == str(compiled.package), out  # loaded, not compiled again
    assert out["served"] == 1 and out["equal"], out  # it served, and its logits are its own eager ones
    assert out["ready_s"] < 60, out


OTHER_PROCESS = """
import json, os, sys, time
import torch
from phi3_lora.config import ModelSettings
from phi3_lora.generate import ChatEngine, GenerationSettings
from phi3_lora.speed import pair_graph
model, adapter, prompt = sys.argv[1:4]
engine = ChatEngine(model, adapter, model_settings=ModelSettings(name=model, dtype="float32", load_in_4bit=False))
history = [{"role": "user", "content": prompt}]
os.environ[pair_graph.ENV] = "1"
t0 = time.perf_counter()
engine.answer_pairs([history], GenerationSettings(max_new_tokens=2))
assert engine._compiled_pair.wait(300), engine._compiled_pair.failed
ready_s = time.perf_counter() - t0
steps = {}
for on in ("0", "1"):
    os.environ[pair_graph.ENV] = on
    seen = []
    def keep(ids, scores, **kwargs):
        seen.append(scores.clone())
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    engine.answer_pairs([history], GenerationSettings(max_new_tokens=8), [keep])
    steps[on] = seen
pair = engine._compiled_pair
print(json.dumps({"built": pair.built, "package": str(pair.package), "served": pair.served, "ready_s": ready_s,
                  "equal": len(steps["0"]) == len(steps["1"]) == 8 and all(torch.equal(a, b) for a, b in zip(steps["0"], steps["1"]))}))
"""


def test_the_package_s_key_is_the_base_weights_and_shapes_not_the_lora_values(compiled):
    """One package serves every adapter of one LoRA structure (its tensors are the step's inputs), but another
    base weight, LoRA rank or thread count is another package: a model of the same shape never runs another's."""
    import copy

    from phi3_lora.speed import pair_artifact

    w = compiled._weights
    k = pair_artifact.key(w, 2)
    other = copy.copy(w)
    other.lora = {name: copy.copy(plan) for name, plan in w.lora.items()}
    for plan in other.lora.values():
        plan.a_t, plan.b_t = plan.a_t * 3, plan.b_t + 1
    assert pair_artifact.key(other, 2) == k  # other LoRA values: the same package
    assert pair_artifact.key(w, 1) != k  # another thread count
    moved = copy.copy(w)
    moved.layers = [dict(parts) for parts in w.layers]
    moved.layers[1]["down_proj"] = w.layers[1]["down_proj"].clone()
    moved.layers[1]["down_proj"][0, 0] += 1e-3
    assert pair_artifact.key(moved, 2) != k  # one base weight moved
    first = next(iter(other.lora))
    other.lora[first].a_t = other.lora[first].a_t[:, :-1]
    assert pair_artifact.key(other, 2) != k  # another rank


def test_a_damaged_or_partial_package_is_ignored_and_compiled_again(engine, compiled, monkeypatch):
    """A package whose bytes changed (a disk error, a write cut short) is never loaded: it is removed and compiled
    again in a child process, and the new step gives the eager logits; a compile's leftover temporary folder is
    not taken for a package."""
    from phi3_lora.speed import pair_artifact

    monkeypatch.setenv(pair_graph.ENV, "1")
    package = compiled.package
    leftover = package.parent.parent / ".partial-leftover"
    leftover.mkdir()
    (leftover / pair_artifact.PACKAGE).write_bytes(b"half a package")
    with open(package, "r+b") as f:  # the same size, other bytes
        f.seek(package.stat().st_size // 2)
        f.write(b"\0" * 64)
    engine.set_adapter(engine.adapter_dir)
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert compiled.wait(timeout=900), compiled.failed
    assert compiled.built and compiled.package == package  # compiled again, into the same place
    assert pair_artifact.find(package.parent.name) == package  # whole again
    test_the_compiled_pair_gives_the_eager_logits_and_is_used_once_ready(engine, compiled, monkeypatch)


def test_no_compile_starts_while_a_run_trains(engine, compiled, tmp_path, monkeypatch):
    """A training run of the watched runs folder holds the compile back (it would take the cores of a 2-core
    machine for minutes); once the run is gone, the next pair answer starts it, at nice 19."""
    import os
    import subprocess
    import sys

    from phi3_lora import runs
    from phi3_lora.speed import background
    from phi3_lora.threads import THREADS_ENV

    monkeypatch.setenv(THREADS_ENV, str(compiled.threads or 1))  # the load of a shared test machine is not asked
    monkeypatch.setenv(pair_graph.ENV, "1")
    folder = tmp_path / "runs"
    folder.mkdir()
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs.write_active(folder, "20260101-000000-training", runs.ProcessRecord.of(trainer.pid))
        assert "20260101-000000-training" in (background.training_busy(folder) or "")
        engine.serve_compare(folder)
        engine.set_adapter(engine.adapter_dir)  # a fresh step to compile
        engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
        assert engine.compiled_pair_phase == "waiting" and compiled._thread is None
    finally:
        trainer.kill()
        trainer.wait()
    assert background.training_busy(folder) is None
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert engine.compiled_pair_phase in ("compiling", "ready")
    thread = compiled._thread
    try:  # below everything else: a run that starts now gets the cores
        assert thread is None or os.getpriority(os.PRIO_PROCESS, thread.native_id) == background.NICE
    except ProcessLookupError:  # it ended in between
        pass
    assert compiled.wait(timeout=300), compiled.failed


def test_no_compile_starts_without_the_memory_for_its_compiler(engine, compiled, monkeypatch):
    """The compiler process loads a second copy of the model and peaks at several times the step's weights: where
    the available memory (this machine's, read as the check reads it) is short of that, the compile is held back
    and says why; once it is not, the next pair answer starts it (here: loads the package already there)."""
    from phi3_lora.speed import background
    from phi3_lora.threads import THREADS_ENV

    monkeypatch.setenv(THREADS_ENV, str(compiled.threads or 1))  # the load of a shared test machine is not asked
    monkeypatch.setenv(pair_graph.ENV, "1")
    assert background.available_memory() > 0
    monkeypatch.setattr(background, "MEMORY_FACTOR", 10**12)  # a step whose compiler would need petabytes
    engine.set_adapter(engine.adapter_dir)  # a fresh step to compile
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert engine.compiled_pair_phase == "waiting" and compiled._thread is None
    assert "memory available" in compiled.held_back
    monkeypatch.undo()
    monkeypatch.setenv(THREADS_ENV, str(compiled.threads or 1))
    monkeypatch.setenv(pair_graph.ENV, "1")
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert engine.compiled_pair_phase in ("compiling", "ready")
    assert compiled.wait(timeout=300), compiled.failed


def test_a_new_adapter_waits_for_the_old_compile_to_end(engine, compiled, tmp_path, monkeypatch):
    """An adapter attached while its predecessor's step compiles (an empty package cache: a compiler process
    runs): the old compile runs on to its end, and the new adapter's starts only after it, never two compiles
    (and their memory) at once; it then finds the package the old one left (the same LoRA structure)."""
    monkeypatch.setenv(pair_graph.ENV, "1")
    monkeypatch.setenv("PHI3_LORA_CACHE", str(tmp_path / "cache"))
    engine.set_adapter(engine.adapter_dir)
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    old = compiled._thread
    assert old is not None and old.is_alive()
    engine.set_adapter(engine.adapter_dir)
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert old.is_alive() and compiled._thread is None and compiled.phase == "waiting"
    old.join(900)
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert compiled._thread is not None and compiled._thread is not old
    assert compiled.wait(timeout=300), compiled.failed
    assert compiled.built is False  # loaded the old compile's package


def test_by_default_only_compare_engines_compile(engine, compiled, tmp_path, monkeypatch):
    """PHI3_LORA_COMPILED_PAIR unset, options.COMPILED_PAIR_CPU on: an engine that does not serve the app's Compare
    (the CLI, an evaluation: gone before a compile pays back) never starts one; a Compare engine asks to (held back
    here by a training run, so nothing compiles)."""
    import subprocess
    import sys

    from phi3_lora import options, runs

    monkeypatch.delenv(pair_graph.ENV, raising=False)
    monkeypatch.setattr(options, "COMPILED_PAIR_CPU", True)
    engine.set_adapter(engine.adapter_dir)  # a fresh step
    compiled.by_default = False
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
    assert engine.compiled_pair_phase is None and compiled._thread is None and compiled.held_back is None
    folder = tmp_path / "runs"
    folder.mkdir()
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs.write_active(folder, "20260101-000000-training", runs.ProcessRecord.of(trainer.pid))
        engine.serve_compare(folder)
        engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=2))
        assert engine.compiled_pair_phase == "waiting" and compiled._thread is None
    finally:
        trainer.kill()
        trainer.wait()


def test_off_means_eager_and_a_new_adapter_drops_the_step(engine, compiled, monkeypatch):
    monkeypatch.setenv(pair_graph.ENV, "0")
    served = compiled.served
    engine.answer_pairs([SHORT], GenerationSettings(max_new_tokens=3))
    assert compiled.served == served
    adapter = engine.adapter_dir
    engine.set_adapter(adapter)  # the compiled step froze the old adapter's weights: it goes with them
    assert not compiled.ready and compiled.failed is None


def test_the_cache_keeps_only_the_most_recently_used_packages(tmp_path):
    import os

    from phi3_lora.speed import pair_artifact

    for i, name in enumerate(("a", "b", "c", "d")):  # d was used last, a first
        (tmp_path / name).mkdir()
        (tmp_path / name / pair_artifact.META).write_text("{}")
        os.utime(tmp_path / name / pair_artifact.META, (1000 + i, 1000 + i))
    os.utime(tmp_path / "a" / pair_artifact.META, (2000, 2000))  # a loaded again (find touches it): newest
    (tmp_path / ".partial-x").mkdir()  # a compile in progress is not a package
    assert pair_artifact.prune(tmp_path, 2) == ["c", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-x", "a", "d"]
