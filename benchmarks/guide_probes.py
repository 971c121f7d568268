"""Two measurements docs/guide.md asks for that ``solotune bench`` does not make (run on a GPU by
benchmarks/run_guide_h200.sh; a CPU run with --layers 1 is a smoke test only):

* **forward peak with and without grad**: one forward of a [batch, seq] micro-batch through the
  Llama-2-7B architecture (random init, pure bf16), peak CUDA memory above the weights, under
  ``torch.no_grad()`` and with every weight requiring grad (what training's forward keeps for backward);
* **KV cache cost and benefit**: the bytes ``setup_cache`` allocates for prompt + new tokens, and
  greedy decode time with and without the cache (same tokens: checked).

    python benchmarks/guide_probes.py --out OUT/probes     # writes OUT/probes/results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def forward_peaks(model, batch: int, seq: int, device: torch.device) -> list[dict]:
    """Peak bytes above the weights of one forward, no grad vs grad (logits freed inside the probe)."""
    tokens = torch.randint(3, model.config.vocab_size, (batch, seq), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    rows = []
    for mode in ("no_grad", "grad"):
        for p in model.parameters():
            p.requires_grad_(mode == "grad")
        base = _allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.set_grad_enabled(mode == "grad"):
            out = model(tokens)
            _sync(device)
            held = _allocated(device) - base  # what the forward leaves alive: logits + saved activations
            del out
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) - base
        rows.append({"mode": mode, "batch": batch, "seq": seq, "peak_above_weights_bytes": peak,
                     "held_after_forward_bytes": held,
                     "logits_bytes": batch * seq * model.config.vocab_size * 2})
    for p in model.parameters():
        p.requires_grad_(False)
    return rows


def kv_cache(model, prompt_len: int, new_tokens: int, batch: int, device: torch.device) -> dict:
    """Cache bytes (measured allocation) and decode seconds with / without it."""
    from solotune.generate import generate_tokens

    base = _allocated(device)
    model.setup_cache(batch, prompt_len + new_tokens)
    cache_bytes = _allocated(device) - base
    model.clear_cache()
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(1)).tolist()
    out, times = {}, {}
    for kv in (True, False):
        generate_tokens(model, prompt, max_new_tokens=2, kv_cache=kv)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out[kv] = generate_tokens(model, prompt, max_new_tokens=new_tokens, kv_cache=kv)
        _sync(device)
        times[kv] = time.perf_counter() - t0
    agree = sum(a == b for r1, r2 in zip(out[True], out[False]) for a, b in zip(r1, r2)) / (batch * new_tokens)
    c = model.config
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_bytes": cache_bytes,
            "cache_bytes_formula": 2 * c.n_layers * batch * (prompt_len + new_tokens) * c.n_kv_heads * c.head_dim * 2,
            "kv_s": times[True], "no_cache_s": times[False], "token_agreement": agree}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="override depth (CPU smoke runs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from solotune.api import resolve_device
    from solotune.config import ModelConfig
    from solotune.model import build_model

    device = resolve_device("auto")
    cfg = ModelConfig.from_name(args.model)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    with torch.no_grad():
        model = build_model(cfg, dtype=torch.bfloat16, device=device, seed=0).eval()
    result = {
        "meta": {"model": args.model, "layers": cfg.n_layers, "dtype": "bfloat16", "weights": "random init",
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                 "command": "python3 benchmarks/guide_probes.py " + " ".join(
                     f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")},
        "forward": forward_peaks(model, args.batch, args.seq, device),
        "kv_cache": [kv_cache(model, args.prompt_len, args.new_tokens, b, device) for b in (1, args.batch)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
