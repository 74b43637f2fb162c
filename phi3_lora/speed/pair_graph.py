"""Compare's pair decoding step (base row + tuned row) compiled for the CPU, with the eager step's numbers.

On a 2-core CPU the eager pair step is mostly dispatch: ~3,900 small aten calls and the Python around them for
~33 ms of products (docs/benchmarks.md, "Compare's pair on a 2-core Xeon with AMX"). torch.compile (inductor,
weights frozen) removes most of that, but a compiled step is only used where it gives the eager step's logits bit
for bit, so Compare's answers stay the ones export and verify reproduce:

- Attention covers exactly the filled length, through transformers' own `sdpa_attention_forward` run eagerly
  inside one opaque op (`phi3_lora::pair_attend`): the keys/values are written into preallocated buffers and
  attention gets the filled slice, with the mask (or no mask) and the GQA form transformers picks eagerly. A
  StaticCache attends over its whole length, masked, and changed the embedded model's base answer.
- RMSNorm and SiLU * up are fused by inductor in float32, spelled in the order ATen's CPU kernels compute them
  (`aten_order`: its mean's cascade of vector sums, SiLU as g / (1 + exp(-g))), checked against ATen compiled
  before the step compiles; elsewhere (bf16, another vector width) they run eagerly inside opaque ops. Left to
  itself inductor sums in another order. What else inductor fuses is exact: bf16 adds and products rounded after
  each op as eagerly (`emulate_precision_casts`), copies, the embedding lookup.
- The Linear products are oneDNN's packed inner products, packed for the step's 2 rows, q/k/v and gate/up as one
  product each, as `cpu_linear` runs them eagerly (`pair_step.compiler_settings`). The tuned row's LoRA update is
  `merging.RowRouting`'s own `mm`/`addmm` on the tuned row's slice only (the base row never gets it), the LoRA
  tensors runtime inputs, not frozen.

Checked bit for bit in float32 (the embedded model, 3 prompts x 64 steps; tests/test_pair_graph.py on a tiny
Llama); bf16 is not yet checked on hardware with native bf16. Only Llama-shaped models whose adapter `RowRouting`
routes, two rows (one base, one tuned). The step is an AOTInductor package (`pair_artifact`): compiled in a child
process at nice 19 and only loaded here (`CompiledPair.start` waits for it in a background thread, which holds
the GIL only for the load's second or two), cached on disk per base weights, LoRA structure, thread count and
torch, so a restarted app loads it instead of compiling. Eager steps serve until it is ready, and a failure is
logged once and leaves eager in place. When a row's answer ends it stays in the compiled batch, frozen (its
tokens ignored), so the step serves the longer answer to its end (`decoding.greedy_decode`); if the step fails,
the rows go on eagerly from the same cache contents (`PairState.to_dynamic_cache`). It compiles only while no
training runs and the memory holds its compiler (`background`), and runs only at the thread count it was compiled
at. On the 2-core EPYC (float32) the step takes 0.74-0.81x of the eager pair
step (docs/benchmarks.md, twelfth session) and a package compiles in 3-5 minutes; `asked`,
options.COMPILED_PAIR_CPU say when it is on.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from phi3_lora.speed import background, pair_artifact, pair_step

log = logging.getLogger(__name__)

ENV = "PHI3_LORA_COMPILED_PAIR"  # "1" / "0": compile Compare's pair step or not (default: options.COMPILED_PAIR_CPU)
ROWS = 2  # one base row, one tuned row


def enabled() -> bool:
    from phi3_lora import options

    value = os.environ.get(ENV, "").strip()
    return value == "1" if value in ("0", "1") else bool(options.COMPILED_PAIR_CPU)


def asked(model: Any, by_default: bool) -> bool:
    """Whether this engine's pair step is to compile: always with PHI3_LORA_COMPILED_PAIR=1; by default
    (options.COMPILED_PAIR_CPU) only for the app's Compare engines (`by_default`: a one-shot CLI or an evaluation
    would pay the compile and leave before it pays back) and in float32, where the step is checked bit for bit
    (bf16 is not yet checked on hardware with native bf16)."""
    import torch

    if os.environ.get(ENV, "").strip() == "1":
        return True
    core = pair_step.llama_core(model)
    return enabled() and by_default and core is not None and core.embed_tokens.weight.dtype == torch.float32


def supported(model: Any, routing: Any, rows: int) -> str | None:
    """Why Compare's pair on `model` cannot take the compiled step (None: it can)."""
    import torch

    core = pair_step.llama_core(model)
    if rows != ROWS or routing is None or routing.first_tuned != 1:
        return "not a one-prompt pair"
    if core is None:
        return "not a Llama-shaped model"
    weight = core.embed_tokens.weight
    from phi3_lora import cpu_linear

    if weight.device.type != "cpu" or not cpu_linear.available(model):
        return "not on the CPU with packed products (cpu_linear)"
    config = core.config
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa" or getattr(config, "hidden_act", "") != "silu" \
            or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) \
            or os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
        return "attention, activation or biases differ from Llama's"
    if not routing.plain_fast():
        return "an adapter layer the routing does not take the fast way"
    return None


class CompiledPair:
    """One engine's compiled pair step (its model, adapter and dtype): loaded from the package cache, or compiled
    in a child process first (`pair_artifact`), by a background thread on first use while no training runs
    (`background`); served once ready; `clear()` when the adapter or the weights change.

    The step runs only at the CPU thread count it was compiled at (`threads`: inductor writes it into the package's
    OpenMP loops). An answer that gets another count (a loaded machine gives answers 1 thread,
    `threads.generation_threads`) runs eagerly and the step stays for the next answer."""

    def __init__(self, runs_dir: Any = None) -> None:
        self.runs_dir = runs_dir  # whose training runs hold the compile back (None: runs.default_runs_dir())
        self.by_default = False  # an engine of the app's Compare: compiled by default (`asked`)
        self._lock = threading.Lock()
        self._step: Callable[..., Any] | None = None  # the compiled step, once it has run once
        self._weights: pair_step.Weights | None = None
        self._thread: threading.Thread | None = None
        self._previous: threading.Thread | None = None  # the compile of an adapter that clear() dropped
        self._generation = 0  # bumped by clear(): a compile of an older adapter is thrown away
        self.failed: str | None = None
        self.compile_s: float | None = None
        self.served = 0  # answers that switched over to the compiled step (tests, the bench)
        self.steps = 0  # pair steps the compiled step ran (tests, the bench)
        self.threads: int | None = None  # the CPU thread count the step was compiled at, and runs at
        self.other_threads = 0  # pair steps that ran eagerly because their answer got another thread count
        self.held_back: str | None = None  # why the compile has not started (a training run, a busy machine)
        self.source: dict[str, Any] | None = None  # how a child process loads this engine's model and adapter
        self.built: bool | None = None  # whether the step's package was compiled (False: loaded from the cache)
        self.package: Any = None  # the loaded package's path

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._previous = self._thread  # a compile of the old adapter runs on to its end (a thread cannot stop)
            self._step, self._weights, self._thread, self.failed, self.compile_s = None, None, None, None, None
            self.built, self.package, self.source = None, None, None

    @property
    def ready(self) -> bool:
        return self._step is not None

    @property
    def phase(self) -> str | None:
        """Where the compiled step stands, for Compare's status line: "ready", "compiling", "waiting" (held back by
        a training run or a busy machine), "failed", or None (not asked for: off, or not a pair it serves)."""
        if self._step is not None:
            return "ready"
        if self.failed is not None:
            return "failed"
        if self._thread is not None:
            return "compiling"
        return "waiting" if self.held_back is not None else None

    def start(self, model: Any, routing: Any, rows: int) -> bool:
        """Start compiling for this model and adapter if it may and has not started; True when a compiled step
        is ready to use. The caller holds the engine's lock (the weights are read here, not in the thread)."""
        if self._step is not None:
            return True
        if self._thread is not None or self.failed is not None or not enabled():
            return False
        reason = supported(model, routing, rows)
        if reason is not None or not asked(model, self.by_default):
            return False
        previous = self._previous
        if previous is not None and previous.is_alive():  # one compile at a time: two would double its memory
            self.held_back = "the previous adapter's compile is still ending"
            return False
        weights = pair_step.weights(model, routing)
        self.held_back = background.training_busy(self.runs_dir) or background.memory_short(_weight_bytes(weights))
        if self.held_back is not None:  # asked again at the next pair answer
            return False
        with self._lock:
            self._weights = weights
            generation = self._generation
            # its own adapter's source: a clear() and set_adapter while it hashes would hand it None or the next one's
            self._thread = threading.Thread(target=self._compile, args=(weights, generation, self.source), daemon=True,
                                            name="phi3-lora-compile-pair")
            self._thread.start()
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background compile or load ends (tests, the bench); True when the step is ready."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.ready

    def _compile(self, weights: pair_step.Weights, generation: int, source: dict[str, Any] | None) -> None:
        import time

        import torch

        from phi3_lora.threads import cpu_threads

        background.lower_priority()  # below the answers' threads and any training run: they get the cores first
        started = time.perf_counter()
        # at the count answers get on a machine that is not oversubscribed (inductor bakes it into the package)
        with cpu_threads(torch.device("cpu"), steady=True):
            threads = torch.get_num_threads()
        self._build(weights, generation, source, threads, started)

    def _build(self, weights: pair_step.Weights, generation: int, source: dict[str, Any] | None, threads: int,
               started: float) -> None:
        """The package for these weights, LoRA structure and thread count: from the cache, else compiled in a
        child process (`pair_artifact`); then loaded here (seconds)."""
        import time

        try:
            key = pair_artifact.key(weights, threads)
            package = pair_artifact.find(key)
            self.built = package is None
            if package is None:
                if source is None:
                    raise RuntimeError("the engine did not say which model and adapter it holds")
                package = pair_artifact.compile_in_child({**source, "threads": threads}, key)
            loaded = pair_artifact.load(package)
        except Exception as exc:  # noqa: BLE001 - any compiler or loader failure leaves the eager step in place
            log.warning("Compare's compiled pair step is off for this adapter (eager steps go on): %s", exc)
            with self._lock:
                if generation == self._generation:
                    self.failed = f"{type(exc).__name__}: {exc}"
            return
        lora = [t for plan in weights.lora.values() for t in (plan.a_t, plan.b_t)]
        with self._lock:
            if generation == self._generation:
                self._step = lambda *inputs: loaded(*inputs, lora)
                self.compile_s, self.threads, self.package = time.perf_counter() - started, threads, package

    def fail(self, exc: BaseException) -> None:
        """The compiled step raised while decoding: off for this adapter, logged once; the caller goes on eagerly."""
        log.warning("Compare's compiled pair step is off for this adapter (eager steps go on): %s", exc)
        with self._lock:
            self._step, self.failed = None, f"{type(exc).__name__}: {exc}"

    def begin(self, cache: Any, mask: Any, max_new: int) -> "PairState | None":
        """The compiled decoding state for a pair whose prompt `cache` (a DynamicCache) holds, or None when the
        compiled step is not ready."""
        import torch

        with self._lock:
            step, weights = self._step, self._weights
        if step is None or weights is None or not enabled():
            return None
        capacity = mask.shape[1] + max_new + 1
        if torch.get_num_threads() != self.threads:  # the package runs its loops at its own count: eager this time
            self.other_threads += 1
            return None
        if capacity > pair_artifact.CAPACITY_MAX:
            return None
        state = PairState.empty(weights, capacity=capacity)
        state.load(cache)
        self.served += 1

        def counted(*inputs: Any) -> Any:
            logits = step(*inputs)
            self.steps += 1
            return logits

        state.step_fn, state.rotary = counted, weights.rotary
        return state


def _weight_bytes(w: pair_step.Weights) -> int:
    """The bytes of the base weights the step reads (its constants once compiled); a tied head counted once."""
    tensors = [w.embed, w.head, w.final_norm, *(t for parts in w.layers for t in parts.values())]
    unique = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


@dataclass
class PairState:
    """One pair answer's keys and values in preallocated buffers [2, kv heads, capacity, head dim] per layer,
    the 2-D padding mask, and [write position, padded] for the opaque attention op."""

    k: list[Any]
    v: list[Any]
    mask: Any
    state: Any
    filled: int = 0
    step_fn: Callable[..., Any] | None = None
    rotary: Any = None

    @classmethod
    def empty(cls, w: pair_step.Weights, capacity: int) -> "PairState":
        import torch

        shape = (ROWS, w.kv_heads, capacity, w.head_dim)
        dtype = w.embed.dtype
        return cls([torch.zeros(shape, dtype=dtype) for _ in w.layers], [torch.zeros(shape, dtype=dtype)
                                                                         for _ in w.layers],
                   torch.ones(ROWS, capacity, dtype=torch.bool), torch.zeros(2, dtype=torch.long))

    def example_inputs(self) -> tuple[Any, ...]:
        import torch

        head_dim = self.k[0].shape[-1]
        cos = torch.ones(ROWS, 1, head_dim, dtype=self.k[0].dtype)
        self.state[0] = 3
        return (torch.zeros(ROWS, 1, dtype=torch.long), cos, torch.zeros_like(cos), self.k, self.v, self.mask,
                self.state)

    def load(self, cache: Any) -> None:
        """Copy a DynamicCache's keys and values in (the prompt, eagerly prefilled)."""
        for layer, k, v in zip(cache.layers, self.k, self.v):
            self.filled = layer.keys.shape[2]
            k[:, :, :self.filled].copy_(layer.keys)
            v[:, :, :self.filled].copy_(layer.values)

    def step(self, ids: Any, positions: Any, mask: Any) -> Any:
        """The pair's next logits [2, vocab] (float32) for token ids and position ids [2, 1]; `mask` is the 2-D
        attention mask with this step's column, as the eager step gets it."""
        cos, sin = self.rotary(self.k[0], positions)
        filled = mask.shape[1]
        self.mask[:, :filled].copy_(mask)
        self.state[0], self.state[1] = filled - 1, int(not bool(mask.all()))
        import torch

        logits = self.step_fn(ids, cos, sin, self.k, self.v, self.mask, self.state)
        self.filled = filled
        return logits

    def to_dynamic_cache(self, cache: Any) -> None:
        """Put the buffers' filled part back into `cache` (a DynamicCache), as the eager steps would have made it."""
        for layer, k, v in zip(cache.layers, self.k, self.v):
            layer.keys = k[:, :, :self.filled].clone()
            layer.values = v[:, :, :self.filled].clone()
