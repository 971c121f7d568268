"""Exploration probe of the fp8 base on the GPU (not a bench cell): (1) torch._scaled_mm against the
fp64 product of the same codes (forward and input gradient apart, and whether the CPU and GPU row
quantizations give the same codes); (2) what a compiled block with and without checkpointing saves
for backward (the forward graph's outputs after the min-cut partitioner), bf16 vs fp8 base.

    python benchmarks/fp8_probe.py
"""

from __future__ import annotations

import functools

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import apply_lora
from solotune.quant import swap_in_quantized
from solotune.quant.fp8 import fp8_linear, quantize_fp8, quantize_rows
from solotune.train.loss import full_logits_loss


def products() -> None:
    for m, k, n in ((512, 1024, 768), (4096, 4096, 11008)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, generator=g, device="cuda").bfloat16().requires_grad_(True)
        w = torch.randn(n, k, generator=g, device="cuda") * 0.02
        q, s = quantize_fp8(w)
        y = fp8_linear(x, q, q.t().contiguous(), s)
        dy = torch.randn(y.shape, generator=g, device="cuda").bfloat16()
        y.backward(dy)
        xq, a = quantize_rows(x.detach())
        xq_cpu, a_cpu = quantize_rows(x.detach().cpu())
        same = torch.equal(xq.view(torch.uint8).cpu(), xq_cpu.view(torch.uint8)) and torch.equal(a.cpu(), a_cpu)
        ref = ((xq.double() * a.double()) @ (q.double() * s.double()[:, None]).t())
        gq, b = quantize_rows(dy * s)
        dref = (gq.double() * b.double()) @ q.double()
        for name, got, r in (("y", y, ref), ("dx", x.grad, dref)):
            d = (got.double() - r).abs()
            i = int(d.argmax())
            print(f"{m}x{k}x{n} {name}: max |diff| {d.max().item():.4g} at {divmod(i, r.shape[1])} "
                  f"(ref {r.view(-1)[i].item():.4g}, got {got.view(-1)[i].item():.4g}), rms rel "
                  f"{(d.pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item():.3g}; codes cpu==gpu {same}")


def saved_sets() -> None:
    sizes: list[int] = []

    def fw_compiler(gm, ex):
        out = [nd for nd in gm.graph.nodes if nd.op == "output"][0]
        rows = []
        for a in out.args[0]:
            v = a.meta.get("val") if hasattr(a, "meta") else None
            if isinstance(v, torch.Tensor) and not a.name.startswith("primals"):
                rows.append((a.name, tuple(v.shape), str(v.dtype)))
        sizes.append(len(rows))
        print("   saved (non-input):", rows)
        return gm.forward

    def backend(gm, ex):
        return aot_module_simplified(gm, ex, fw_compiler=fw_compiler, bw_compiler=lambda g, e: g.forward,
                                     partition_fn=min_cut_rematerialization_partition)

    for q in ("none", "fp8"):
        for ck in ("off", "all"):
            cfg = ModelConfig(name="t", dim=256, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=512, hidden_dim=512,
                              max_seq_len=256)
            model = build_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
            if q != "none":
                swap_in_quantized(model, q, compute_dtype=torch.bfloat16)
            apply_lora(model, ("wq", "wv"), rank=8, alpha=16, dropout=0.05, lora_dtype=torch.bfloat16)
            model.set_grad_checkpointing(ck)
            model.train()
            torch._dynamo.reset()
            print(q, ck)
            model.compile_blocks(backend=backend, fullgraph=True)
            tokens = torch.randint(0, 512, (2, 128), device="cuda")
            model(tokens, head=functools.partial(full_logits_loss, labels=tokens)).backward()
            # and with Inductor: peak of a 4-layer model's step
            torch._dynamo.reset()


def inductor_peaks(layers: int = 4) -> None:
    """Peak above the weights of a compiled (Inductor) 7B-width step, mb8 x 512, bf16 vs fp8 base."""
    from solotune.api import load
    from solotune.data.batch import Batch
    from solotune.peft.spec import LoRASpec

    for q in ("none", "fp8"):
        for ck in ("off", "all"):
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            model, _ = load("llama2-7b", dtype=torch.bfloat16, device=torch.device("cuda"), random_init=True,
                            n_layers=layers, quantize=q)
            apply_lora(model, LoRASpec(16, 32.0, 0.05, ("wq", "wv")), lora_dtype=torch.bfloat16)
            model.set_grad_checkpointing(ck)
            model.compile_blocks()
            model.train()
            ids = torch.randint(3, 32000, (8, 512))
            batch = Batch(ids, ids.clone(), torch.arange(512).expand(8, 512).contiguous(), tuple((512,) for _ in range(8))).to("cuda")
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                model(batch, head=functools.partial(full_logits_loss, labels=batch.labels)).backward()
            print(f"inductor {q} ckpt={ck}: peak above the model {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
            del model


def compiled_vs_eager() -> None:
    """Adapter gradients of a 2-layer bf16 LoRA model: eager / Inductor blocks, bf16 / fp8 / fp8-lean base,
    relative distances between every pair (is compiled fp8 as far from eager fp8 as fp8 is from bf16?)."""
    from solotune.config import ModelConfig

    cfg = ModelConfig(name="fp8", dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, hidden_dim=512,
                      max_seq_len=256)
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(2)).cuda()
    grads = {}
    for q in ("none", "fp8", "fp8-lean"):
        for compiled in (False, True):
            model = build_model(cfg, seed=0, dtype=torch.bfloat16)
            if q != "none":
                swap_in_quantized(model, q, compute_dtype=torch.bfloat16)
            apply_lora(model, ("wq", "wv"), rank=8, alpha=16, dropout=0.0, generator=torch.Generator().manual_seed(0))
            for n, p in model.named_parameters():
                if "lora_b" in n:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
            model.to("cuda").train()
            torch._dynamo.reset()
            if compiled:
                model.compile_blocks(fullgraph=True)
            loss = model(tokens, head=functools.partial(full_logits_loss, labels=tokens))
            loss.backward()
            grads[(q, compiled)] = (float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                           if p.requires_grad]))
    keys = list(grads)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ga, gb = grads[a][1], grads[b][1]
            print(f"{a} vs {b}: loss {grads[a][0]:.5f} / {grads[b][0]:.5f}, |dg|/|g| {((ga - gb).norm() / gb.norm()).item():.4f}")


if __name__ == "__main__":
    import sys

    print(torch.__version__, torch.cuda.get_device_name())
    parts = sys.argv[1:] or ["products", "saved_sets", "inductor_peaks", "compiled_vs_eager"]
    for part in parts:
        globals()[part]()
