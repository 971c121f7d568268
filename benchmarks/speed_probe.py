"""Exploration probe for issue 11 (not a `bench` cell): Llama-2-7B architecture, random init, pure
bf16, LoRA r16 a32 dropout .05 on wq,wv, AdamW, micro-batch 8 of 512 random tokens (all targets),
one process, variants in sequence. Reports warm-up (compile) time apart from the steady-state
tokens/s and the CUDA peak; optionally a profiler table of the top ops.

    python benchmarks/speed_probe.py --out OUT [--variants eager,compile,...] [--layers 32]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time

import torch

from solotune.api import load
from solotune.data.batch import Batch
from solotune.peft import apply_lora
from solotune.peft.spec import LoRASpec
from solotune.train.loss import get_loss
from solotune.train.optim import make_optimizer

VARIANTS = {  # name -> (checkpointing, compile, quantize, micro-batch, loss[, kernels])
    "eager": ("off", False, "none", 8, "full-logits"),
    "compile": ("off", True, "none", 8, "full-logits"),
    "eager-gc": ("all", False, "none", 8, "full-logits"),
    "compile-gc": ("all", True, "none", 8, "full-logits"),
    "eager-sel": ("selective", False, "none", 8, "full-logits"),
    "compile-sel": ("selective", True, "none", 8, "full-logits"),
    "qlora-b1": ("all", False, "nf4", 1, "full-logits"),
    "qlora-b8": ("all", False, "nf4", 8, "full-logits"),
    "qlora-b8-compile": ("all", True, "nf4", 8, "full-logits"),
    "qlora-b1-compile": ("all", True, "nf4", 1, "full-logits"),
    "compile-flce": ("off", True, "none", 8, "fused-linear-ce"),
    "compile-gc-flce": ("all", True, "none", 8, "fused-linear-ce"),
    "qlora-b8-compile-flce": ("all", True, "nf4", 8, "fused-linear-ce"),
    "qlora-b1-compile-flce": ("all", True, "nf4", 1, "fused-linear-ce"),
    "qlora-b1-graphs": ("all", "reduce-overhead", "nf4", 1, "full-logits"),
    "lora-b1-compile": ("off", True, "none", 1, "full-logits"),
    "lora-b1-graphs": ("off", "reduce-overhead", "none", 1, "full-logits"),
    # the loss compiled too (what compiled training runs now do: train/loss.py COMPILABLE_LOSSES)
    "compile-cl": ("off", True, "none", 8, "full-logits+compiled"),
    "compile-gc-cl": ("all", True, "none", 8, "full-logits+compiled"),
    "qlora-b8-compile-cl": ("all", True, "nf4", 8, "full-logits+compiled"),
    "qlora-b1-compile-cl": ("all", True, "nf4", 1, "full-logits+compiled"),
    # + the fused Triton kernels (RMSNorm, SwiGLU, RoPE) inside the compiled blocks
    "compile-flce-k": ("off", True, "none", 8, "fused-linear-ce", "triton"),
    "compile-gc-flce-k": ("all", True, "none", 8, "fused-linear-ce", "triton"),
    "qlora-b8-compile-flce-k": ("all", True, "nf4", 8, "fused-linear-ce", "triton"),
    # the frozen base in fp8, multiplied in fp8 (solotune.quant.fp8: torch._scaled_mm)
    "fp8-compile-cl": ("off", True, "fp8", 8, "full-logits+compiled"),
    "fp8-compile-gc-cl": ("all", True, "fp8", 8, "full-logits+compiled"),
    "fp8-eager": ("off", False, "fp8", 8, "full-logits"),
    "qlora-fp8-b8-compile-cl": ("all", True, "nf4-fp8", 8, "full-logits+compiled"),
    # issue 10's batch-1 cell (frontier7-h200 run1): where its ~0.1 GiB over the planner comes from
    "qlora-fp8-b1-compile-flce": ("all", True, "nf4-fp8", 1, "fused-linear-ce"),
}


def run(name: str, layers: int, warmup: int, steps: int, profile: bool, out: str, snapshot: bool = False) -> dict:
    ckpt, compiled, quantize, mb, loss_name, *rest = VARIANTS[name]
    kernels = rest[0] if rest else "off"
    torch._dynamo.reset()
    gc.collect()  # the previous variant's model (compiled graphs keep it in reference cycles)
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    model, _ = load("llama2-7b", dtype=torch.bfloat16, device=dev, random_init=True, n_layers=layers,
                    quantize=quantize)
    apply_lora(model, LoRASpec(16, 32.0, 0.05, ("wq", "wv")), generator=torch.Generator().manual_seed(0),
               lora_dtype=torch.bfloat16)
    if kernels != "off":
        from solotune.kernels import use_fused_kernels

        use_fused_kernels(model)
    model.set_grad_checkpointing(ckpt)
    if compiled:
        model.compile_blocks(**({"mode": compiled} if isinstance(compiled, str) else {}))
    model.train()
    opt = make_optimizer("adamw", model, lr=1e-5, weight_decay=0.0, device=dev)
    base_loss, _, how = loss_name.partition("+")
    loss_fn = get_loss(base_loss, compiled=how == "compiled")
    T = 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (mb, T), generator=g)
    batch = Batch(ids, ids.clone(), torch.arange(T).expand(mb, T).contiguous(), tuple((T,) for _ in range(mb))).to(dev)
    n_targets = batch.num_targets

    def step():
        loss = model(batch, head=functools.partial(loss_fn, labels=batch.labels))
        (loss / n_targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = {"variant": name, "layers": layers, "micro_batch": mb, "checkpointing": ckpt, "compile": compiled,
           "quantize": quantize, "loss": loss_name, "kernels": kernels, "warmup_s": t_warm, "warmup_steps": warmup,
           "step_s": dt, "tokens_per_s": mb * T / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if snapshot:  # one more step under the allocator's recorder: what is alive at its peak, by site
        from solotune.bench.snapshot import format_peak, record_peak

        torch.cuda.reset_peak_memory_stats()
        summary = record_peak(step)
        res["snapshot_peak_gib"] = summary.peak / 2**30
        with open(os.path.join(out, f"snapshot-{name}.txt"), "w") as f:
            f.write(format_peak(summary, top=40) + "\n")
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        table_cpu = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        with open(os.path.join(out, f"profile-{name}.txt"), "w") as f:
            f.write(table + "\n\n" + table_cpu)
    del model, opt
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", default="", help="comma list of variants to profile")
    ap.add_argument("--memory-snapshot", default="",
                    help="comma list of variants: one more step recorded, what is alive at its peak (snapshot-*.txt)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    profiled = set(filter(None, a.profile.split(",")))
    snapped = set(filter(None, a.memory_snapshot.split(",")))
    for name in a.variants.split(","):
        try:
            r = run(name, a.layers, a.warmup, a.steps, name in profiled, a.out, name in snapped)
        except Exception as e:  # one failing variant must not end the probe
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out, "probe.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
