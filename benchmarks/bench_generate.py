"""Generation throughput: solotune with KV cache, without KV cache, and HF transformers `generate`,
same weights, same prompt, same run.

Llama-2-7B architecture, random init, bf16, batch 1, a 256-token prompt (real Alpaca text, LLaMA-2
tokenizer) + 256 new tokens (EOS ignored, so every method decodes exactly 256 tokens).

    python benchmarks/bench_generate.py --out benchmarks/results/generate-7b
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="override depth (CPU smoke runs)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from solotune.api import load
    from solotune.data.alpaca import format_prompt, load_records
    from solotune.generate import generate_tokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load(args.model, dtype=dtype, device=device, random_init=True, n_layers=args.layers, seed=0)
    # A real 256-token prompt: consecutive Alpaca prompts+outputs, cut to length.
    ids: list[int] = [tok.bos_id]
    for rec in load_records("alpaca-sample"):
        ids += tok.encode(format_prompt(rec) + rec.output, allow_special=False)
        if len(ids) >= args.prompt_len:
            break
    prompt = ids[: args.prompt_len]
    n_new = args.new_tokens

    def ours(kv: bool):
        return generate_tokens(model, [prompt], max_new_tokens=n_new, kv_cache=kv, stop_ids=())[0]

    rows = []
    results: dict[str, list[int]] = {}

    def bench(name: str, fn) -> None:
        fn_small = fn  # warm-up: one full call (kernels, allocator, cuBLAS handles)
        out = fn_small()
        times = []
        for _ in range(args.repeats):
            box = {}
            times.append(timed(lambda: box.setdefault("out", fn()), device))
            out = box["out"]
        results[name] = list(out)
        t = sorted(times)[len(times) // 2]
        rows.append({"method": name, "new_tokens": len(out), "median_s": t, "tokens_per_s": len(out) / t,
                     "times_s": times})
        print(f"{name:24s} {len(out):4d} tokens  median {t:8.3f} s  {len(out) / t:8.1f} tok/s", flush=True)

    bench("solotune kv-cache", lambda: ours(True))
    bench("solotune no-cache", lambda: ours(False))
    if not args.no_hf:
        import transformers

        from solotune.checkpoint.hf import canonical_to_hf

        cfg = model.config
        kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device(device):
            hf = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**kw), dtype=dtype)
        missing, unexpected = hf.load_state_dict(canonical_to_hf(model.state_dict(), cfg), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        hf.tie_weights()
        hf.eval()
        x = torch.tensor([prompt], device=device)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, num_beams=1, pad_token_id=0)
            return out[0, len(prompt):].tolist()

        bench("hf transformers generate", run_hf)

    base = results["solotune kv-cache"]
    agree = {k: sum(a == b for a, b in zip(base, v)) / max(len(base), 1) for k, v in results.items()}
    kv = next(r for r in rows if r["method"] == "solotune kv-cache")["tokens_per_s"]
    for r in rows:
        r["agreement_with_kv_cache"] = agree[r["method"]]
        r["ratio_vs_solotune_kv"] = r["tokens_per_s"] / kv
    meta = {
        "benchmark": "generation throughput", "model": args.model, "layers": model.config.n_layers,
        "weights": "random init (architecture only)", "dtype": str(dtype), "batch": 1,
        "prompt_tokens": len(prompt), "new_tokens": n_new, "repeats": args.repeats,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Generation throughput — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · `{meta['command']}`", "",
             f"{args.model} architecture ({meta['layers']} layers), {meta['weights']}, {dtype}, batch 1, "
             f"{len(prompt)}-token prompt + {n_new} new tokens, greedy, median of {args.repeats}.", "",
             "| method | tokens/s | time (s) | vs solotune KV cache | same tokens as KV cache |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['median_s']:.3f} | "
                     f"{r['ratio_vs_solotune_kv']:.2f}× | {r['agreement_with_kv_cache']:.0%} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
