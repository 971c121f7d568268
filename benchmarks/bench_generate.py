"""Generation throughput: solotune compiled (static KV cache + CUDA-graph decode step), solotune
eager (same cache, no compile) and HF transformers `generate`, same weights, same prompts, same run.

Llama-2-7B architecture, random init, bf16, a 256-token prompt per row (real Alpaca text, LLaMA-2
tokenizer; rows start at different offsets) + 256 new tokens (EOS ignored, so every method decodes
exactly 256 tokens per row), batch 1 and batch 16. The compiled decoder's first call compiles and
captures; its compile time is reported apart from the timed calls. Rows are written to
``OUT/results.json`` as they finish (a crash keeps the finished ones).

    python benchmarks/bench_generate.py --out "$OUT/gen"
    python benchmarks/bench_generate.py --layers 2 --batches 1 --new-tokens 8 --no-hf --out /tmp/g  # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch


def timed(fn: Callable[[], list[list[int]]], device: torch.device) -> tuple[float, list[list[int]]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def prompts_from_alpaca(tok, n_rows: int, length: int) -> list[list[int]]:
    """``n_rows`` prompts of exactly ``length`` tokens: BOS + consecutive Alpaca text, row r from record r on."""
    from solotune.data.alpaca import format_prompt, load_records

    records = load_records("alpaca-sample")
    rows = []
    for r in range(n_rows):
        ids: list[int] = [tok.bos_id]
        for rec in records[r:]:
            ids += tok.encode(format_prompt(rec) + rec.output, allow_special=False)
            if len(ids) >= length:
                break
        rows.append(ids[:length])
    return rows


def predictions(model, batch: int, slots: int, bandwidth: float) -> dict[str, float]:
    """Bytes one decode step must read (every weight once + the whole static cache) and the
    bandwidth bound on tokens/s that follows (all rows of the batch count)."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elt = model.tok_embeddings.weight.element_size()
    cache_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * slots * cfg.head_dim * elt
    step = weight_bytes + cache_bytes
    return {"weight_bytes": weight_bytes, "kv_cache_bytes_per_step": cache_bytes, "bytes_per_step": step,
            "bandwidth_bytes_per_s": bandwidth, "bound_tokens_per_s": batch * bandwidth / step}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Share of equal tokens, and the mean length of the common prefix (bf16 paths drift apart)."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    n = sum(len(r) for r in a) or 1
    prefix = []
    for ra, rb in zip(a, b):
        k = 0
        while k < min(len(ra), len(rb)) and ra[k] == rb[k]:
            k += 1
        prefix.append(k)
    return {"same_tokens": same / n, "common_prefix": sum(prefix) / max(len(prefix), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="override depth (CPU smoke runs)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--methods", default="compiled,eager,hf", help="comma-separated: compiled, compiled-cublas, compiled-int8, eager, hf")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of the compiled decoder")
    ap.add_argument("--slow-repeats", type=int, default=1, help="timed calls of eager and HF (launch-bound, slow)")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.27, help="HBM bandwidth for the bound (H200 measured)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from solotune.api import load
    from solotune.generate import Decoder, generate_tokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load(args.model, dtype=dtype, device=device, random_init=True, n_layers=args.layers, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    methods = [m for m in args.methods.split(",") if not (m == "hf" and args.no_hf)]
    all_prompts = prompts_from_alpaca(tok, max(batches), args.prompt_len)
    n_new = args.new_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "generation throughput", "model": args.model, "layers": model.config.n_layers,
        "weights": "random init (architecture only)", "dtype": str(dtype), "batches": batches,
        "prompt_tokens": args.prompt_len, "new_tokens": n_new, "repeats": args.repeats,
        "slow_repeats": args.slow_repeats, "greedy": True,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    rows: list[dict] = []

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    hf = make_hf(model, device, dtype) if "hf" in methods else None
    int8 = int8_model_of(model) if "compiled-int8" in methods else None  # built once, same weights
    for B in batches:
        prompts = all_prompts[:B]
        outs: dict[str, list[list[int]]] = {}
        for method in methods:
            row = {"method": method, "batch": B}
            try:
                row.update(measure(method, B, prompts, n_new, model, hf, Decoder, generate_tokens, device, args, outs,
                                   int8))
                row.update(predictions(model, B, row["slots"], args.bandwidth_tbs * 1e12))
            except Exception as e:  # keep the other methods' numbers; the traceback goes to the log
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
            ref = next(iter(outs), None)  # the first method that ran (compiled by default)
            if method in outs and ref != method:
                row["agreement_with"] = {"method": ref, **agreement(outs[ref], outs[method])}
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    write_summary(args.out, meta, rows)
    return 0


def int8_model_of(model):
    """The int8 weight-only model of ``model``'s weights (its block linears quantized as they stream)."""
    from solotune.api import materialize

    p = next(model.parameters())
    return materialize(model.config, iter(model.state_dict().items()), p.dtype, p.device, None, "int8").eval()


def measure(method: str, B: int, prompts, n_new: int, model, hf, Decoder, generate_tokens, device, args, outs,
            int8=None) -> dict:
    """Time one method at batch B: its first call (compile + capture for ``compiled``), then timed calls.
    ``int8``: the int8 weight-only model that ``compiled-int8`` decodes with."""
    if method == "hf":
        def run(n: int = n_new) -> list[list[int]]:
            return run_hf(hf, prompts, n, device)
        repeats = args.slow_repeats
        first, _ = timed(lambda: run(8), device)  # warm-up: kernels, allocator, cuBLAS handles
        ttft = None
        slots = len(prompts[0]) + n_new  # HF's dynamic cache: the filled part only (an upper bound)
    else:
        # compiled: the Decoder's CUDA default (CUDA graphs + GEMV tuning); compiled-cublas: CUDA graphs
        # with Inductor's default matmuls (cuBLAS), i.e. mode="reduce-overhead", the previous default
        # compiled-int8: the same compiled step over the int8 weight-only model (quantized from the same weights)
        how = {"mode": "reduce-overhead"} if method == "compiled-cublas" else {}
        dec = Decoder(int8 if method == "compiled-int8" else model, compile=method.startswith("compiled"), **how)

        def run(n: int = n_new) -> list[list[int]]:
            return generate_tokens(dec, prompts, n, stop_ids=())
        repeats = args.repeats if method.startswith("compiled") else args.slow_repeats
        slots = dec.cache_len(len(prompts[0]) + n_new)
        first, _ = timed(run if method.startswith("compiled") else (lambda: run(8)), device)
        ttft = sorted(timed(lambda: run(1), device)[0] for _ in range(3))[1]  # eager prefill + first pick
    times = []
    out: list[list[int]] = []
    for _ in range(max(1, repeats)):
        t, out = timed(run, device)
        times.append(t)
    outs[method] = out
    t = sorted(times)[len(times) // 2]
    n_tok = sum(len(o) for o in out)
    row = {"new_tokens_per_row": n_new, "generated_tokens": n_tok, "median_s": t, "times_s": times,
           "tokens_per_s": n_tok / t, "row_tokens_per_s": n_new / t, "first_call_s": first, "slots": slots}
    if method.startswith("compiled"):
        row["compile_s"] = first - t  # the first call's extra time: tracing, Inductor, CUDA-graph capture
        row["mode"] = dec.mode
        row["inductor_options"] = dec.options
    if ttft is not None:
        row["ttft_s"] = ttft
        row["decode_tokens_per_s"] = B * (n_new - 1) / max(t - ttft, 1e-9)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def make_hf(model, device: torch.device, dtype: torch.dtype):
    """HF LlamaForCausalLM with our weights (random init, so the same architecture and numbers)."""
    import transformers

    from solotune.checkpoint.hf import canonical_to_hf

    cfg = model.config
    kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**kw), dtype=dtype)
    missing, unexpected = hf.load_state_dict(canonical_to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def run_hf(hf, prompts: list[list[int]], n_new: int, device: torch.device) -> list[list[int]]:
    x = torch.tensor(prompts, device=device)  # equal lengths: no padding
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, num_beams=1, pad_token_id=0)
    return out[:, x.shape[1]:].tolist()


def write_summary(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"# Generation throughput — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · `{meta['command']}`", "",
             f"{meta['model']} architecture ({meta['layers']} layers), {meta['weights']}, {meta['dtype']}, "
             f"{meta['prompt_tokens']}-token prompts + {meta['new_tokens']} new tokens per row, greedy; median of "
             f"{meta['repeats']} (compiled) / {meta['slow_repeats']} (eager, HF) timed calls after a warm-up.", "",
             "| batch | method | tokens/s (all rows) | per row | time (s) | compile (s) | TTFT (s) | "
             "bandwidth bound | same tokens as the first method |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['method']} | error: {r['error'][:80]} | | | | | | |")
            continue
        agree = r.get("agreement_with")
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['row_tokens_per_s']:.1f} | "
            f"{r['median_s']:.3f} | {r.get('compile_s', float('nan')):.1f} | {r.get('ttft_s', float('nan')):.3f} | "
            f"{r['bound_tokens_per_s']:.0f} | {'' if agree is None else format(agree['same_tokens'], '.0%')} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
