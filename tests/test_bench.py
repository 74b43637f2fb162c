"""The GPU bench's pure parts (row sets and order, the settle-then-time rule, the same-loss check, repeats) and
the parts that run here: the tokenizer folder a fresh checkout builds from the GGUF in tests/assets, the Llama
copy of a Phi-3 model that the Unsloth rows read (same function), and the kernel buckets of the profile."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest
import torch

from bench import (chat_mix, model_folders, paired, prestart, report, row_process, row_sets, row_trainers, schedule,
                   step_profile, timing)


def test_main_set_has_engine_unsloth_and_recipe_at_every_budget():
    rows = row_sets.ordered_rows(None, "main")
    assert len({r.name for r in rows}) == len(rows)
    for budget, _ in row_sets.BUDGETS:
        for data in ("full", "mix"):
            kinds = {r.kind for r in rows if r.budget_gb == budget and r.data == data and r.four_bit}
            assert {"engine", "unsloth"} <= kinds, (budget, data)
    assert {r.data for r in rows if r.kind == "recipe"} == {"full", "mix"}
    refs = {r.name for r in rows if r.kind == "recipe"}
    assert all(r.recipe_ref in refs for r in rows if r.kind != "recipe")


def test_repeats_alternate_the_order_and_exact_names_keep_theirs():
    rows = row_sets.ordered_rows(None, "main")
    assert row_sets.run_order(rows, 0) == rows and row_sets.run_order(rows, 1) == rows[::-1]
    names = ["=unsloth QLoRA full, 8 GiB", "=recipe QLoRA full rows"]
    assert [r.name for r in row_sets.ordered_rows(names, ["all", "explore"])] == [n[1:] for n in names]
    picked = [r.name for r in row_sets.ordered_rows(["compiled"], ["all", "explore"])]
    assert picked and all("compiled" in n for n in picked)


def test_a_series_of_calls_goes_on_where_the_last_stopped_and_packs_what_fits(tmp_path):
    rows = row_sets.ordered_rows(["=recipe QLoRA full rows", "=engine QLoRA full, 8 GiB",
                                  "=engine LoRA-16 full, 24 GiB", "=unsloth QLoRA full, 8 GiB"], "main")
    earlier = {"runs": [
        {"name": rows[0].name, "repeat": 0, "tokens_per_s": 1.0, "process_s": 40.0},
        {"name": rows[1].name, "repeat": 0, "error": "row process exited 1", "process_s": 5.0},
        {"name": rows[3].name, "repeat": 0, "tokens_per_s": 1.0, "process_s": 100.0}]}
    (tmp_path / "call-1.json").write_text(json.dumps(earlier))
    (tmp_path / "notes.txt").write_text("not a result")
    done, history = schedule.done_runs([str(tmp_path), str(tmp_path / "missing")])
    assert done == {(rows[0].name, 0), (rows[3].name, 0)}  # the failed run is run again
    pending = schedule.pending_runs(rows, 0, 2, done, last=["LoRA-16"])
    assert [(r.name, rep) for r, rep in pending] == [
        (rows[1].name, 0), (rows[3].name, 1), (rows[1].name, 1), (rows[0].name, 1),  # repeat 1 reversed
        (rows[2].name, 0), (rows[2].name, 1)]  # the 16-bit row after every other run
    # 60 s left: Unsloth (100 s here before, +10%) is passed over for the recipe (40 s, +10%); a row never run
    # here counts as FIRST_RUN_S for its kind
    later = [run for run in pending if run[0].kind != "engine"]
    assert schedule.next_run(later, history, 60.0)[0].kind == "recipe"
    assert schedule.next_run(later, history, 30.0) is None
    assert schedule.next_run(pending, history, schedule.FIRST_RUN_S["engine"]) == pending[0]
    assert schedule.next_run(pending, history, None) == pending[0]


def test_a_row_patch_is_set_for_the_row_and_put_back():
    from phi3_lora import options

    with row_trainers.patched({"phi3_lora.options.COMPILE_MODE": "reduce-overhead"}):
        assert options.COMPILE_MODE == "reduce-overhead"
    assert options.COMPILE_MODE is None


def _feed(timer: timing.SettleTimer, seconds: list[float], tokens: int = 100) -> int:
    """Feed step times to the timer as the trainer would; returns how many steps ran before it said stop."""
    for i, s in enumerate(seconds):
        timer._t = timing.time.perf_counter() - s
        timer._tok = tokens
        if timer._step_end():
            return i + 1
    return len(seconds)


def test_timer_waits_for_the_step_time_to_settle_then_times_the_median():
    timer = timing.SettleTimer(steps=4, min_warmup=3, max_warmup=10, min_total=10)
    # compilation in the first steps, then a steady 0.5 s with one stall
    ran = _feed(timer, [9.0, 3.0, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 0.5, 0.5, 0.5, 0.5])
    res = timer.result()
    assert res["settled"] and res["warmup_steps"] == 6  # the 5th and 6th steps agreed with the one before
    assert ran == 10  # 4 timed steps after 6 of warm-up
    assert res["steps"] == 4 and res["step_s_median"] == pytest.approx(0.5, abs=0.01)
    assert res["tokens_per_s"] == pytest.approx(200, rel=0.03)  # the stall does not move the median
    assert res["step_tok_s_min"] < 60


def test_timer_trains_at_least_min_total_steps():
    timer = timing.SettleTimer(steps=2, min_warmup=1, max_warmup=5, min_total=10)
    assert timer.max_steps() == 10
    assert _feed(timer, [0.5] * 12) == 10 and timer.result()["steps"] == 8


def test_timer_that_never_settles_says_so():
    timer = timing.SettleTimer(steps=2, min_warmup=1, max_warmup=4)
    _feed(timer, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    assert timer.result()["settled"] is False and timer.result()["warmup_steps"] == 4


def test_same_loss_check_and_repeats():
    ref = {"losses": [10.0] * 9 + [8.00]}
    assert report.same_loss({"losses": [10.0] * 9 + [8.05]}, ref)[2]
    assert not report.same_loss({"losses": [10.0] * 9 + [8.2]}, ref)[2]
    assert report.same_loss({"losses": [10.0] * 5}, ref) is None
    runs = [{"name": "a", "steps": 5, "tokens_per_s": t, "peak_gib": p} for t, p in ((100, 5.0), (120, 5.5), (90, 5.2))]
    (agg,) = report.aggregate(runs)
    assert agg["tokens_per_s"] == 100 and agg["repeats_tok_s"] == [90, 100, 120] and agg["peak_gib"] == 5.5
    table = report.table([dict(agg, name="a", data="full", kind="engine", mfu=0.1, tokens_per_step=8192,
                              step_tok_s_min=80, step_tok_s_max=130, warmup_steps=4, settled=True)])
    assert "90 / 100 / 120" in table
    merged = report.aggregate(runs + [{"name": "b", "steps": 5, "tokens_per_s": 50, "peak_gib": 4.0}])
    assert report.repeats_phrase(merged).startswith("1-3 runs per row")
    assert report.repeats_phrase([agg]).startswith("3 runs per row")


@pytest.mark.slow
def test_fresh_checkout_builds_the_tokenizer_from_the_gguf(tmp_path):
    folder = model_folders.ensure_tokenizer(tmp_path / "phi3_tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) >= 32000 and tok.convert_tokens_to_ids("<|end|>") != tok.unk_token_id
    assert model_folders.ensure_tokenizer(folder) == folder  # built once


def test_llama_copy_is_the_same_function(tiny_phi3_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    llama_dir = model_folders.make_llama_copy(tiny_phi3_dir, tmp_path / "llama")
    assert json.loads((llama_dir / "config.json").read_text())["model_type"] == "llama"
    phi3 = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, dtype=torch.float32).eval()
    llama = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(10, 30000, (1, 16))
    with torch.no_grad():
        a, b = phi3(input_ids=ids).logits, llama(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4


def test_kernel_groups():
    cases = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits": "attention",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*": "dequant 4-bit",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>": "elementwise",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy":
            "copy/cast",
        "Memcpy DtoD (Device -> Device)": "copy/cast",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float": "dropout",
        "_rms_norm_backward_kernel": "liger/triton",
        "_swiglu_forward_kernel": "liger/triton",
        "something_else": "other",
    }
    assert {k: step_profile.kernel_group(k) for k in cases} == cases


@pytest.mark.slow
def test_cpu_recipe_row_trains_and_is_timed(tiny_phi3_dir, tmp_path):
    """`bench --cpu`'s plain-recipe row (trl's SFTTrainer with peft_config, as the cookbook) trains and is timed
    by the same timer as the engine row, with its loss per step."""
    from phi3_lora.config import preset

    lora = preset("quick-cpu").lora
    data = chat_mix.write_jsonl(chat_mix.chat_rows("mix", 16), tmp_path / "rows.jsonl")
    timer = timing.SettleTimer(steps=1, min_warmup=1, max_warmup=1)
    trainer = row_trainers.cpu_recipe_trainer(str(tiny_phi3_dir), data, timer.max_steps(), tmp_path / "out", 2, 64,
                                              lora)
    res = timing.time_trainer(trainer, timer)
    assert res["steps"] == 1 and res["tokens_per_s"] > 0 and res["tokens_per_step"] > 0
    assert len(res["losses"]) == 2 and all(loss is not None and loss > 0 for loss in res["losses"])


@pytest.mark.slow
def test_free_running_timer_counts_the_same_steps_tokens_and_losses(tiny_phi3_dir, tmp_path):
    """The free-running timer (no wait for the device at each step, losses from training_step, Trainer logging
    only at the end) times the same steps as the synchronised one: the same tokens per step and the same loss at
    every step of the same seeded run, each step's time read two steps late (so it asks to stop two steps late)."""
    from phi3_lora.config import preset

    lora = preset("quick-cpu").lora
    data = chat_mix.write_jsonl(chat_mix.chat_rows("mix", 24), tmp_path / "rows.jsonl")
    results, trainers = {}, {}
    for free in (False, True):
        torch.manual_seed(0)
        timer = timing.SettleTimer(steps=2, min_warmup=1, max_warmup=1, free=free)
        trainer = row_trainers.cpu_recipe_trainer(str(tiny_phi3_dir), data, timer.max_steps(), tmp_path / f"o{free}", 2,
                                           384, lora, dtype_name="float32")
        results[free], trainers[free] = timing.time_trainer(trainer, timer), trainer
    synced, free = results[False], results[True]
    assert synced["timing"] == "synchronised" and free["timing"] == "free-running"
    assert free["steps"] == synced["steps"] == 2 and free["warmup_steps"] == synced["warmup_steps"] == 1
    tokens = free["tokens_per_step_list"]  # padded rows: counted from the attention mask, on the device
    assert tokens == synced["tokens_per_step_list"] and min(tokens) > 0 and len(set(tokens)) > 1
    ran = {k: t.state.global_step for k, t in trainers.items()}
    assert ran[True] == ran[False] + timing.FREE_LAG
    assert trainers[True].args.logging_steps > ran[True]  # no per-step log: Trainer read no loss on the way
    timed = len(synced["losses"])
    assert all(loss is not None for loss in free["losses"][:timed])
    assert free["losses"][:timed] == pytest.approx(synced["losses"], rel=1e-5)
    assert all(s > 0 for s in free["warmup_step_s"] + free["step_s"]) and free["tokens_per_s"] > 0
    assert free["syncs_in_timed_steps"] is None  # counted on a GPU only


def test_a_profile_lists_where_the_step_waits_for_the_gpu_by_call_site() -> None:
    from types import SimpleNamespace as E

    from bench.step_profile import host_call_sites

    item = ["/site/liger_kernel/ops/fused_linear_cross_entropy.py(132): forward",
            "/site/torch/autograd/function.py(575): apply", "/app/phi3_lora/train.py(10): step"]
    events = [E(name="cudaStreamSynchronize", stack=item), E(name="cudaStreamSynchronize", stack=item),
              E(name="cudaMemcpyAsync", stack=["/site/trl/trainer/sft_trainer.py(900): compute_loss"]),
              E(name="cudaLaunchKernel", stack=item), E(name="cudaStreamSynchronize", stack=[])]
    sites = host_call_sites(events)
    assert sites[0] == ("2 x cudaStreamSynchronize <- /site/liger_kernel/ops/fused_linear_cross_entropy.py(132): "
                        "forward <- /app/phi3_lora/train.py(10): step")  # torch's own frames left out
    assert "1 x cudaMemcpyAsync <- /site/trl/trainer/sft_trainer.py(900): compute_loss" in sites
    assert "1 x cudaStreamSynchronize <- (no Python frame)" in sites
    assert not any("cudaLaunchKernel" in s for s in sites) and len(sites) == 3


def test_timer_says_when_its_timed_steps_ran():
    timer = timing.SettleTimer(2, min_warmup=1, max_warmup=1)
    cb = timer.callback()
    before = time.time()
    for _ in range(3):
        cb.on_step_begin(None, None, None)
        time.sleep(0.01)
        cb.on_step_end(None, None, type("C", (), {})())
    window = timer.result()["timed_window"]
    assert before < timer.spans[1][0] == window[0] < window[1] == timer.spans[2][1] <= time.time()
    assert timer.spans[0][1] <= window[0]  # the warm-up step is not in it


def test_timed_steps_wait_until_no_one_imports(tmp_path):
    """A row's timed steps begin only once no other live process is marked importing (bench/prestart.py)."""
    import subprocess
    import sys

    marks = tmp_path / prestart.IMPORTING
    marks.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (marks / gone.stdout.strip()).touch()  # a process killed while importing: ignored
    assert prestart.quiet(tmp_path)
    (marks / str(os.getpid())).touch()  # a live one
    assert not prestart.quiet(tmp_path)

    timer = timing.SettleTimer(2, min_warmup=1, max_warmup=1, quiet=lambda: prestart.quiet(tmp_path))
    for i in range(8):
        timer._tok = 100
        if i == 4:
            (marks / str(os.getpid())).unlink()
        if timer._step_end():
            break
    result = timer.result()
    assert result["warmup_steps"] == 5 and result["quiet_wait_steps"] == 4 and result["steps"] == 2
    assert timing.SettleTimer(2, quiet=lambda: True).max_steps() > timing.SettleTimer(2).max_steps()


def test_windows_overlap():
    assert prestart.overlap_s([0.0, 10.0], [8.0, 20.0]) == 2.0
    assert prestart.overlap_s([0.0, 10.0], [10.0, 20.0]) == 0.0
    assert prestart.overlap_s(None, [1.0, 2.0]) == 0.0


def test_a_prestarted_row_process_imports_then_waits_for_its_go(tmp_path, monkeypatch):
    """A real row process (engine kind): it imports, says so, and does not begin the row until the go file; its
    result says when its imports ran and when it began (here the row fails: the workdir has no model)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = row_sets.ordered_rows(["=engine QLoRA full, 8 GiB"], "main")[0]
    args = argparse.Namespace(steps=2, peer_path="", row_timeout=300)
    rp = row_process.spawn(row, args, tmp_path, prestart=True)
    try:
        deadline = time.time() + 240
        while prestart.quiet(tmp_path):  # not yet marked importing
            assert rp.proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        while not rp.go_file.with_suffix(".ready").exists():
            assert rp.proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        time.sleep(1.0)
        assert rp.proc.poll() is None and not rp.out.exists()  # imported, waiting
        assert prestart.quiet(tmp_path)  # its importing mark is gone
    except BaseException:
        rp.kill()
        raise
    rp.go()
    result = row_process.collect(rp, 240)
    began, ready = result["import_window"]
    assert began < ready <= rp.go_at <= result["go_at"]
    assert "error" in result and result["process_s"] < time.time() - ready


def test_engine_patch_pairs_and_explore_rows_for_the_ragged_kernel():
    assert row_trainers.engine_patch(["phi3_lora.options.CUDNN_RAGGED=true", "x.Y=0.5", "x.Z=fast"]) == {
        "phi3_lora.options.CUDNN_RAGGED": True, "x.Y": 0.5, "x.Z": "fast"}
    rows = row_sets.ordered_rows(["ragged cuDNN frontend"], "explore")
    assert sorted(r.budget_gb or 0 for r in rows) == [0, 8, 24]
    assert all(r.patch == {"phi3_lora.options.CUDNN_RAGGED": True} and r.data == "mix" for r in rows)


def _run(name: str, warmup: list[float], timed: list[float], tokens: list[int]) -> dict:
    return {"name": name, "warmup_step_s": warmup, "step_s": timed, "tokens_per_step_list": tokens}


def test_engine_and_peer_are_compared_on_the_same_packs_not_on_their_own_windows():
    # Pack 4 is short (half the tokens, half the time) for both. The engine settled after 3 warm-up steps and
    # timed packs 3-6; the peer settled after 5 and timed packs 5-8. The engine takes 0.9 s for a full pack, the
    # peer 1.0 s, so the engine is 1.111x on every pack they share.
    full, short = 1000, 500
    engine = _run("engine QLoRA mix, 8 GiB", [5.0, 4.0, 0.9], [0.9, 0.45, 0.9, 0.9], [full, short, full, full])
    peer = _run("unsloth QLoRA mix, 8 GiB", [9.0, 6.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0], [full] * 4)
    c = paired.compare([engine], [peer])
    assert c is not None
    assert (c["first"], c["last"], c["packs"]) == (2, 6, 5)  # compile steps 0-1 left out; 7-8 only the peer has
    assert c["pack_ratio_median"] == pytest.approx(1 / 0.9) and c["summed_ratio"] == pytest.approx(1 / 0.9)
    # The rows' own tok/s (mean tokens over the median step) say the peer is faster: the short pack sits in the
    # engine's window only.
    def tok_s(run: dict) -> float:
        return sum(run["tokens_per_step_list"]) / len(run["step_s"]) / sorted(run["step_s"])[len(run["step_s"]) // 2]
    assert tok_s(engine) < tok_s(peer)


def test_a_pack_one_run_was_slow_for_takes_the_fastest_run_and_one_slow_pack_does_not_move_the_median():
    a1 = _run("engine X", [3.0, 3.0], [1.0, 1.0, 1.0, 1.0], [10] * 4)
    a2 = _run("engine X", [3.0, 3.0], [1.0, 2.5, 1.0, 1.0], [10] * 4)  # interference in one run
    b = _run("unsloth X", [3.0, 3.0], [1.2, 1.2, 1.2, 3.6], [10] * 4)  # one pack the peer recompiled for
    c = paired.compare([a1, a2], [b])
    assert c["pack_ratio_min"] == pytest.approx(1.2) and c["pack_ratio_max"] == pytest.approx(3.6)
    assert c["pack_ratio_median"] == pytest.approx(1.2)
    assert c["summed_ratio"] == pytest.approx(7.2 / 4.0)


def test_packs_of_other_tokens_are_not_compared_and_rows_without_a_peer_are_not_listed():
    a = _run("engine X", [3.0, 3.0], [1.0, 1.0], [10, 10])
    b = _run("unsloth X", [3.0, 3.0], [1.0, 2.0], [10, 11])  # step 4 saw another pack
    assert paired.compare([a], [b])["packs"] == 1
    assert paired.compare([a], [_run("unsloth X", [3.0], [], [])]) is None
    runs = [a, b, _run("engine Y", [3.0, 3.0], [1.0], [10]), _run("recipe X", [3.0, 3.0], [1.0], [10])]
    assert paired.peer_pairs([r["name"] for r in runs]) == [("engine X", "unsloth X")]
    text = paired.paired_table(runs)
    assert "| engine X | unsloth X | 1 (steps 3-3; runs 1 / 1) |" in text and "engine Y" not in text
    assert paired.paired_table([runs[2], runs[3]]) == ""


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _FakeProcess:
    """A row's process in a fake clock: `finish` spends the row's time (what a real process would take)."""

    def __init__(self, row, prestarted: bool, log: list) -> None:
        self.row, self.log, self.killed = row, log, False
        log.append(("start", row.name, prestarted))

    def go(self) -> None:
        self.log.append(("go", self.row.name))

    def kill(self) -> None:
        self.killed = True
        self.log.append(("kill", self.row.name))


def _series(rows_s: dict[str, float], history_s: dict[str, float], deadline: float | None, prestart: bool = True):
    """Run schedule.run_series over rows named in `rows_s` (each taking that many seconds), with earlier runs'
    process times `history_s` (what `expected_s` sizes them by), against a fake clock and a deadline."""
    clock, log, results = _Clock(), [], []
    rows = {r.name: r for r in row_sets.all_rows()}
    pending = [(rows[name], 0) for name in rows_s]
    history = [{"name": name, "process_s": s} for name, s in history_s.items()]

    def finish(proc: _FakeProcess, timeout: float) -> dict:
        spent = min(rows_s[proc.row.name], timeout)
        window = [clock.now + spent - 6, clock.now + spent]
        clock.now += spent
        log.append(("done", proc.row.name))
        return {"name": proc.row.name, "process_s": spent, "timed_window": window,
                "import_window": [window[0] - 30, window[0] - 10]}

    schedule.run_series(pending, history, results, lambda row, pre: _FakeProcess(row, pre, log), finish,
                     prestart=prestart, row_timeout=200,
                     seconds_left=lambda: None if deadline is None else deadline - clock.now,
                     stopped=lambda: False, on_result=lambda r: log.append(("result", r["name"])))
    return log, results, pending


ENGINE, PEER, RECIPE = "engine QLoRA full, 8 GiB", "unsloth QLoRA full, 8 GiB", "recipe QLoRA full rows"


def test_a_series_prestarts_the_next_run_and_lets_it_begin_only_after_the_one_before_ends():
    log, results, pending = _series({ENGINE: 40, PEER: 50, RECIPE: 30}, {}, deadline=None)
    assert [r["name"] for r in results] == [ENGINE, PEER, RECIPE] and pending == []
    assert log == [("start", ENGINE, False), ("start", PEER, True), ("done", ENGINE), ("result", ENGINE),
                   ("go", PEER), ("start", RECIPE, True), ("done", PEER), ("result", PEER), ("go", RECIPE),
                   ("done", RECIPE), ("result", RECIPE)]
    assert [r["repeat"] for r in results] == [0, 0, 0]
    assert "import_overlap_s" not in results[0] and results[1]["import_overlap_s"] == 0.0


def test_a_series_starts_no_run_that_would_not_end_before_the_deadline():
    # Sized by earlier runs (x1.1): engine 44 s, peer 110 s, recipe 33 s; 100 s left: the engine, then not the
    # peer (too long), the recipe instead; the peer stays pending for a later call.
    log, results, pending = _series({ENGINE: 40, PEER: 100, RECIPE: 30}, {ENGINE: 40, PEER: 100, RECIPE: 30},
                                    deadline=100)
    assert [r["name"] for r in results] == [ENGINE, RECIPE]
    assert [row.name for row, _ in pending] == [PEER]
    assert ("start", PEER, True) not in log and ("start", PEER, False) not in log


def test_a_prestarted_run_that_no_longer_fits_after_a_long_run_is_stopped_and_kept_pending():
    # The engine was expected to take 44 s but takes 90: the pre-started recipe (33 s) no longer fits the 100 s.
    log, results, pending = _series({ENGINE: 90, RECIPE: 30}, {ENGINE: 40, RECIPE: 30}, deadline=100)
    assert [r["name"] for r in results] == [ENGINE]
    assert ("start", RECIPE, True) in log and ("kill", RECIPE) in log and ("go", RECIPE) not in log
    assert [row.name for row, _ in pending] == [RECIPE]
