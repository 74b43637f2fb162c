"""The speed path: the parts of training that lean on other libraries' private APIs or internals.

- `lean_lora`: replaces peft's LoRA forward per instance (one addmm), `DropoutLoraA` reads the RNG state
  through `torch._C`; its SwiGLU remake calls Liger's kernel internals.
- `packed_attention`: registers `sdpa_varlen` with transformers' attention interfaces (PyTorch's varlen kernel),
  and skips transformers' host probe of packed rows for it (a private masking function).
- `bnb_codes`: every read of a 4-bit weight (dense values, codes): puts back a weight that bitsandbytes repacked
  for CPU inference first, and cuts 4-bit weights at their packed codes through bitsandbytes' QuantState and a
  private function (`fused` uses it to split Phi-3's fused layers bit-identically).
- `compact_loss`: trl's fused loss head scores only the labelled positions on the CPU too (a private trl helper).
- `label_positions`: on a GPU those positions come from the collator, on the host, into a copy of trl's fused
  forward (trl's chunked kernel and output class).
- `layers`: the memory budget's per-layer plan (partial checkpointing through transformers' per-layer flag),
  compiled decoder layers and the CUDA allocator setting.
- `dequantized`: 16-bit copies of the frozen 4-bit weights where the budget has room (bitsandbytes' own function).
- `sdpa_backend`: cuDNN's attention first in SDPA's kernel order (a private torch function).
- `cudnn_ragged`: cuDNN's fused attention over packs of unequal lengths through cuDNN's own Python frontend, as
  torch custom ops (off: options.CUDNN_RAGGED; measured on an H200, right but slower than flash's varlen kernel).
- `forward_swap`: a layer's forward replaced per instance and put back (lean_lora and dequantized for the model's
  life; the packed CPU weights and Compare's row routing for one call).
- `gguf_once`: transformers' GGUF loader parses a file once in the export verification child (gguf's functions).
- `versions`: the library versions each part was tested with, declared once. With any other installed version
  a part takes the stock path (peft's forward, plain SDPA, re-quantised slices), and one warning per process
  says which and why.

Nothing outside this package patches a library; nothing in it is needed for a correct run.
"""
