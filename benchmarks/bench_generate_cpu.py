"""CPU generation latency of the README's chat example: SmolLM2-135M-Instruct (the embedded model),
"What is the capital of France?" as one chat turn, greedy — time to first token and tokens/s.

Uses only API that predates the static cache (``load``, ``encode_prompt``, ``generate_tokens``), so
the same script measures any checkout: ``PYTHONPATH=<checkout> python3 benchmarks/bench_generate_cpu.py``.
TTFT is a call with ``max_new_tokens=1`` (prefill + first pick); tokens/s is a call forced to
``--new-tokens`` tokens (stop tokens ignored), and decode tokens/s excludes the TTFT from it.
Median of ``--repeats``; one torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="what checkout this is (e.g. main, gen)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from solotune.api import load
    from solotune.generate import encode_prompt, generate_tokens

    model, tok = load("smollm2-135m")
    q = "What is the capital of France?"
    ids = encode_prompt(tok, q, chat=True)
    generate_tokens(model, [ids], 4)  # warm-up
    ttft, _ = median_time(lambda: generate_tokens(model, [ids], 1, stop_ids=()), args.repeats)
    t_n, out = median_time(lambda: generate_tokens(model, [ids], args.new_tokens, stop_ids=()), args.repeats)
    t_ans, ans = median_time(lambda: generate_tokens(model, [ids], 64, stop_ids=tok.stop_ids), args.repeats)
    n = len(out[0])
    row = {
        "label": args.label, "model": "smollm2-135m (embedded GGUF)", "prompt": q, "chat": True,
        "prompt_tokens": len(ids), "threads": args.threads, "repeats": args.repeats,
        "ttft_s": ttft, "forced_tokens": n, "forced_s": t_n, "tokens_per_s": n / t_n,
        "decode_tokens_per_s": (n - 1) / max(t_n - ttft, 1e-9),
        "answer": tok.decode(ans[0]), "answer_tokens": len(ans[0]), "answer_s": t_ans,
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
