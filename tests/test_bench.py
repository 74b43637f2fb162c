"""The GPU bench's pure parts: row order (Liger patches transformers for the rest of the process, so every row
without Liger must run before the first row with it) and the kernel buckets of the profile summary."""

from __future__ import annotations

from bench import train_speed as bench


def _uses_liger(row: bench.Row) -> bool:
    if row.kind == "recipe":
        return row.liger
    return row.overrides.get("train", {}).get("use_liger_kernel", "auto") is not False


def test_rows_without_liger_run_first_in_every_set():
    for sets in (["main"], ["ablations"], ["main", "ablations"], ["all", "explore"], ["main", "lean"]):
        rows = bench.ordered_rows(None, sets)
        flags = [_uses_liger(r) for r in rows]
        first = flags.index(True) if True in flags else len(flags)
        assert all(flags[first:]), (sets, [r.name for r in rows])
        assert len({r.name for r in rows}) == len(rows)


def test_lean_set_is_the_lean_ablations_and_the_budget_free_row():
    rows = bench.ordered_rows(None, ["lean"])
    assert rows and all("lean_lora" in r.name or "whole GPU" in r.name or r.patch for r in rows)
    assert any(r.overrides.get("train", {}).get("lean_lora") is False for r in rows)
    assert any(r.patch == {"phi3_lora.lean_lora.DROPOUT_LORA_A": False} for r in rows)
    assert any(r.patch == {"phi3_lora.lean_lora.REMAKE_INPUTS": False} for r in rows)


def test_a_row_patch_is_set_for_the_row_and_put_back():
    from phi3_lora import lean_lora

    with bench.patched({"phi3_lora.lean_lora.REMAKE_INPUTS": False}):
        assert lean_lora.REMAKE_INPUTS is False
    assert lean_lora.REMAKE_INPUTS is True


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
    assert {k: bench.kernel_group(k) for k in cases} == cases


def test_rows_pick_by_substring_or_exact_name():
    names = ["=engine QLoRA full rows, 24 GiB", "remake"]
    picked = [r.name for r in bench.ordered_rows(names, ["main", "lean"])]
    assert "engine QLoRA full rows, 24 GiB" in picked
    assert all(n == "engine QLoRA full rows, 24 GiB" or "remake" in n for n in picked) and len(picked) == 2
