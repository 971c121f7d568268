"""Issue 11: time each fused kernel against the PyTorch eager reference (model.py's code) and
``torch.compile`` of that reference, at Llama-2-7B shapes in bf16 (8 x 512 tokens, dim 4096,
hidden 11008, 32 heads of 128, vocab 32000); forward alone and forward + backward. The linear
cross-entropy losses are timed the same way with their peak memory. Prints a table and writes
``$OUT/kernels_time.json`` (or the path given as the first argument).

    python3 benchmarks/kernels_time.py [OUT_JSON]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from solotune.kernels.rmsnorm import rms_norm
from solotune.kernels.rope import rope
from solotune.kernels.swiglu import swiglu
from solotune.model import RMSNorm, apply_rope, rope_cos_sin
from solotune.train.loss import chunked_loss, full_logits_loss, fused_linear_ce_loss

B, T, C, H, D, FF, V = 8, 512, 4096, 32, 128, 11008, 32000
N = B * T
BF16 = torch.bfloat16
DEV = "cuda"


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fwd(f, inputs):
    def run():
        with torch.no_grad():
            f(*inputs)
    return run


def fwd_bwd(f, inputs, dy):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        y = f(*inputs)
        y.backward(dy) if dy is not None else y.backward()
    return run


def peak_of(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cases():
    g = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=DEV) * scale).to(BF16).requires_grad_(True)
    norm = RMSNorm(C).to(DEV, BF16)
    x = r(N, C, scale=3.0)
    a, b = r(N, FF, scale=2.0), r(N, FF)
    q = r(B, T, H, D)
    cos, sin = rope_cos_sin(torch.randint(0, 4096, (B, T), device=DEV, generator=g), D, 10000.0, BF16)
    elem = 2  # bf16 bytes
    # name, triton fn, reference fn, inputs, minimal bytes moved (fwd, fwd + bwd)
    yield ("rmsnorm", f"[{N}, {C}]", lambda x: rms_norm(x, norm.weight, norm.eps), lambda x: RMSNorm.forward(norm, x),
           [x], (2 * N * C * elem, 5 * N * C * elem))
    yield ("swiglu", f"[{N}, {FF}]", swiglu, lambda a, b: F.silu(a) * b, [a, b], (3 * N * FF * elem, 8 * N * FF * elem))
    yield ("rope", f"[{B}, {T}, {H}, {D}]", lambda q: rope(q, cos, sin), lambda q: apply_rope(q, cos, sin), [q],
           (2 * N * H * D * elem, 4 * N * H * D * elem))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("OUT", ".")) / "kernels_time.json"
    rows = []
    print(f"{'kernel':<8} {'shape':<20} {'pass':<8} {'triton ms':>10} {'eager ms':>10} {'compiled ms':>12} "
          f"{'x eager':>8} {'x compiled':>10} {'triton GB/s':>12}  (compile s)")
    for name, shape, kern, ref, inputs, (bytes_f, bytes_fb) in cases():
        t0 = time.perf_counter()
        compiled = torch.compile(ref)
        fwd_bwd(compiled, inputs, torch.ones_like(ref(*inputs)))()  # compile fwd + bwd once
        with torch.no_grad():
            compiled(*inputs)  # and the no-grad graph
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        dy = torch.randn_like(ref(*inputs).detach())
        for pas, make, nbytes in (("fwd", lambda f: fwd(f, inputs), bytes_f),
                                  ("fwd+bwd", lambda f: fwd_bwd(f, inputs, dy), bytes_fb)):
            t_k, t_e, t_c = (timed(make(f)) for f in (kern, ref, compiled))
            row = {"kernel": name, "shape": shape, "pass": pas, "triton_ms": t_k, "eager_ms": t_e, "compiled_ms": t_c,
                   "speedup_vs_eager": t_e / t_k, "speedup_vs_compiled": t_c / t_k, "min_bytes": nbytes,
                   "triton_GBps": nbytes / t_k / 1e6, "compile_s": compile_s}
            rows.append(row)
            print(f"{name:<8} {shape:<20} {pas:<8} {t_k:>10.3f} {t_e:>10.3f} {t_c:>12.3f} {t_e / t_k:>8.2f} "
                  f"{t_c / t_k:>10.2f} {nbytes / t_k / 1e6:>12.0f}  ({compile_s:.1f})")

    # the head + loss: 8 x 512 tokens through the frozen 7B head (LoRA), forward + backward, and the peak
    g = torch.Generator(device=DEV).manual_seed(1)
    head = torch.nn.Linear(C, V, bias=False, device=DEV, dtype=BF16).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    hidden = torch.randn(B, T, C, generator=g, device=DEV, dtype=BF16).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g, device=DEV)
    print(f"\n{'loss':<22} {'fwd+bwd ms':>10} {'peak MiB':>10}")
    losses = {"full-logits": full_logits_loss, "full-logits compiled": torch.compile(full_logits_loss),
              "chunked": chunked_loss, "fused-linear-ce": fused_linear_ce_loss}
    for name, fn in losses.items():
        run = fwd_bwd(lambda h: fn(h, head, labels), [hidden], None)
        t = timed(run, iters=10)
        peak = peak_of(run)
        rows.append({"kernel": "loss", "loss": name, "shape": f"[{N}, {C}] x [{V}, {C}]", "pass": "fwd+bwd",
                     "ms": t, "peak_bytes": peak})
        print(f"{name:<22} {t:>10.3f} {peak / 2**20:>10.0f}")

    gpu = torch.cuda.get_device_name()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {out} ({gpu}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
