"""Compare's pair (base + tuned rows of one batch) on a CPU: every speed-up of its decoding step gives the logits
of the plain path bit for bit, in float32 and in bf16 (a float32 adapter on bf16 weights, as `dtype auto` loads
on a CPU with native bf16). Each test records the float32 logits of every decoding step of `answer_pairs` with
the speed-up on and off; equal logits at every step are equal greedy answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3_lora.generate import ChatEngine, GenerationSettings

HISTORIES = [[{"role": "user", "content": "Name three colours of the sea."}],
             [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v with biases, packed together too
def model_dir(request, tmp_path_factory) -> Path:
    from helpers.tiny_models import build_tiny_qwen2

    if request.param == "llama":
        return request.getfixturevalue("tiny_llama_dir")
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2_biases"), random_biases=True)


@pytest.fixture(scope="module")
def random_adapter(model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (r8, alpha 16, all linear layers) whose B is far from zero, so that the tuned rows differ."""
    from helpers.tiny_models import save_strong_adapter

    return save_strong_adapter(model_dir, tmp_path_factory.mktemp("pair_adapter") / "adapter")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, model_dir, random_adapter) -> ChatEngine:
    import torch

    from phi3_lora import cpu_linear
    from phi3_lora.config import ModelSettings

    if getattr(torch, request.param) not in cpu_linear.packable_dtypes():
        pytest.skip("no native bf16 on this CPU: bf16 weights take PyTorch's matmul here")
    name = str(model_dir)
    return ChatEngine(name, random_adapter, model_settings=ModelSettings(name=name, dtype=request.param,
                                                                         load_in_4bit=False))


class _Logits:
    """A StoppingCriteria that stops nothing and keeps each step's logits."""

    def __init__(self) -> None:
        self.steps: list = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps.append(scores.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _pair_logits(engine: ChatEngine) -> tuple[list, list]:
    record = _Logits()
    answers = engine.answer_pairs(HISTORIES, GenerationSettings(max_new_tokens=12), [record])
    return record.steps, answers


def _assert_same(fast: tuple[list, list], plain: tuple[list, list]) -> None:
    import torch

    (fast_steps, fast_answers), (plain_steps, plain_answers) = fast, plain
    assert len(fast_steps) == len(plain_steps) == 12
    assert all(torch.equal(a, b) for a, b in zip(fast_steps, plain_steps))
    assert fast_answers == plain_answers
    base, tuned = fast_steps[0][:2], fast_steps[0][2:]
    assert not torch.equal(base, tuned)  # the tuned rows really carry the adapter's update


@pytest.mark.slow
def test_sibling_layers_as_one_packed_product_give_the_same_logits(engine, monkeypatch):
    from phi3_lora import cpu_linear

    groups: list = []
    real = cpu_linear.sibling_groups

    def seen(*args):
        found = real(*args)
        groups.extend(found)
        return found

    monkeypatch.setattr(cpu_linear, "sibling_groups", seen)
    fused = _pair_logits(engine)
    # q/k/v and gate/up of both decoder layers, the LoRA layers' base layers among them
    assert sorted(len(g.layers) for g in groups) == [2, 2, 3, 3]
    monkeypatch.setattr(cpu_linear, "FUSE_SIBLINGS", False)
    _assert_same(fused, _pair_logits(engine))


@pytest.mark.slow
def test_sibling_lora_layers_share_one_product_with_their_stacked_lora_a(engine, monkeypatch):
    from phi3_lora import families, merging

    shared = _pair_logits(engine)
    routing = merging.RowRouting(merging.plain_lora_layers(engine.model), families.sibling_layers(engine.model))
    assert routing.stacked_groups == 2 * 2  # q/k/v and gate/up of both decoder layers
    monkeypatch.setattr(families, "sibling_layers", lambda model: [])
    _assert_same(shared, _pair_logits(engine))


@pytest.mark.slow
def test_where_the_stacked_product_sums_otherwise_each_lora_layer_keeps_its_own(engine, monkeypatch):
    """A machine whose BLAS sums the stacked lora_A's columns in another order (the 2-core EPYC's float32 at 4
    rows) must not route through the stacked product: the probe says so, and no shared product is made."""
    import torch

    from phi3_lora import families, merging

    routing = merging.RowRouting(merging.plain_lora_layers(engine.model), families.sibling_layers(engine.model))
    group = next(p.group for p in routing._plan.values() if p.group is not None)
    for rows in (1, 2, 4, 7):  # the probe's verdict is the machine's, whatever it is here
        x = torch.randn(rows, group.a_t.shape[0]).to(group.a_t.dtype)
        whole, col, same = x.mm(group.a_t), 0, True
        for a_t in group.a_ts:
            same = same and torch.equal(whole[:, col:col + a_t.shape[1]], x.mm(a_t))
            col += a_t.shape[1]
        assert group.stacks_exactly(rows) == same

    plain = _pair_logits(engine)
    made: list = []

    class Counted(merging.SharedProduct):
        def columns(self, *args, **kwargs):
            made.append(self)
            return super().columns(*args, **kwargs)

    monkeypatch.setattr(merging, "SharedProduct", Counted)
    _pair_logits(engine)
    assert made  # the stacked products are used where the probe allows them
    made.clear()
    monkeypatch.setattr(merging._Group, "stacks_exactly", lambda self, rows: False)
    _assert_same(_pair_logits(engine), plain)
    assert not made


@pytest.mark.slow
def test_a_power_of_two_scaling_folded_into_lora_b_gives_the_same_logits(engine, monkeypatch):
    from phi3_lora import merging

    routing = merging.RowRouting(merging.plain_lora_layers(engine.model))
    mixed = engine.model.dtype != next(p for n, p in engine.model.named_parameters() if "lora_B" in n).dtype
    # alpha 16 / r 8 = 2: folded where the update is rounded apart from the addmm (a float32 adapter on bf16)
    assert all(plan.folded == mixed for plan in routing._plan.values())
    folded = _pair_logits(engine)
    monkeypatch.setattr(merging, "_power_of_two", lambda value: False)
    _assert_same(folded, _pair_logits(engine))


def test_a_shared_product_is_made_once_per_input_and_taken_column_by_column():
    import torch

    from phi3_lora.cpu_linear import SharedProduct

    made = []
    x, y = torch.arange(6.0).view(1, 6), torch.ones(1, 6)
    product = SharedProduct(3)

    def make(t):
        return lambda: made.append(1) or t * 10

    assert product.columns(x, (0,), 1, 0, 2, make(x)).tolist() == [[0.0, 10.0]]
    assert product.columns(x, (0,), 2, 2, 4, make(x)).tolist() == [[20.0, 30.0]] and len(made) == 1  # shared
    assert product.columns(x, (1,), 4, 4, 6, make(x)).tolist() == [[40.0, 50.0]] and len(made) == 2  # other extra
    product.columns(y, (0,), 1, 0, 2, make(y))  # another input: a new product
    product.columns(y, (0,), 1, 0, 2, make(y))  # the same sibling again: a new product too
    assert len(made) == 4
    product.columns(y, (0,), 2, 2, 4, make(y))
    product.columns(y, (0,), 4, 4, 6, make(y))  # every sibling took its columns: nothing is kept
    assert len(made) == 4 and product.out is None and product.key == ()
