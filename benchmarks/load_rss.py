"""Host peak RSS of ``solotune.load`` on a >= 2 GiB Hugging Face checkpoint, for one or more
versions of the code (e.g. before and after streaming loading).

A random Llama-2-7B-width checkpoint with fewer layers is written in a temp directory (deleted at
the end) with solotune's own ``save_hf``, sharded, in two file dtypes:

- ``bf16->bf16``: bf16 file loaded as bf16 (no cast: every tensor can become the parameter as is);
- ``fp32->bf16``: fp32 file loaded as bf16 (every tensor is cast: the old all-at-once path held
  the whole file's tensors and the whole converted model at the same time).

Every measurement runs in a fresh Python subprocess with ``PYTHONPATH`` set to the code under test.
It reports the peak RSS (``getrusage`` ``ru_maxrss``, the kernel's high-water mark, which counts
anonymous *and* mapped-file pages) minus the RSS after ``import torch, solotune``, next to the
final model's bytes and the checkpoint's largest tensor. Streaming's target:
peak <= model + largest tensor + a small constant.

    python benchmarks/load_rss.py --code old=/tmp/old-solotune --code new=. \\
        --out benchmarks/results/load-rss
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GiB = 1 << 30

# Runs in the child: the code under test is whatever `import solotune` finds on PYTHONPATH.
CHILD = r"""
import json, resource, sys, time
import psutil, torch, solotune
proc = psutil.Process()
base = proc.memory_info().rss
base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
model, _ = solotune.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
secs = time.perf_counter() - t0
# Fault in every page of every weight (one read per 4 KiB): tensors may be lazy views of a memory
# map, which the first forward pass would read anyway; unread pages would hide the model's size.
for p in model.parameters():
    p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
seen, model_bytes, largest_param = set(), 0, 0
for p in model.parameters():
    if p.data_ptr() in seen:
        continue
    seen.add(p.data_ptr())
    model_bytes += p.numel() * p.element_size()
    largest_param = max(largest_param, p.numel() * p.element_size())
print(json.dumps({"solotune": solotune.__file__, "base_rss": base, "base_hwm": base_hwm, "peak_rss": peak,
                  "final_rss": proc.memory_info().rss, "model_bytes": model_bytes, "largest_param": largest_param,
                  "load_s": secs, "rss_anon_kb": int(status["RssAnon"].split()[0]),
                  "rss_file_kb": int(status["RssFile"].split()[0])}))
"""

# Runs in a child too (so the parent stays small): writes the checkpoint with the code under --make-with.
MAKE = r"""
import sys, torch
from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.checkpoint import save_hf
from solotune.config import PRESETS
from solotune.model import build_model
cfg = PRESETS["llama2-7b"].replace(n_layers=int(sys.argv[2]), name="llama2-7b-rss")
model = build_model(cfg, dtype=getattr(torch, sys.argv[3]), seed=0)
save_hf(cfg, model.state_dict(), sys.argv[1], max_shard_bytes=1 << 30, tokenizer_file=BUNDLED_LLAMA2_TOKENIZER)
"""


def largest_file_tensor(d: Path) -> tuple[int, int]:
    """(total bytes, largest tensor bytes) from the safetensors headers."""
    from safetensors import safe_open

    total = largest = 0
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                n *= {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
                total += n
                largest = max(largest, n)
    return total, largest


def run(code_root: Path, ckpt: Path, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    # cwd = the code root: ``python -c`` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), dtype], env=env, cwd=code_root, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", action="append", required=True, metavar="LABEL=PATH",
                    help="a solotune source root to measure (repeatable)")
    ap.add_argument("--make-with", default=str(Path(__file__).resolve().parents[1]),
                    help="solotune root that writes the checkpoints (default: this checkout)")
    ap.add_argument("--scenarios", default="bf16->bf16:5,fp32->bf16:2",
                    help="FILE->LOAD:LAYERS, comma separated (7B width; 5 bf16 layers = 2.43 GiB, 2 fp32 = 2.54 GiB)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="where the temporary checkpoints go")
    ap.add_argument("--out", type=Path, default=None, help="write results.json + raw.log here")
    args = ap.parse_args()
    codes = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in args.code]

    rows, log = [], []
    tmp = Path(tempfile.mkdtemp(prefix="solotune-load-rss-", dir=args.tmp))
    try:
        for sc in args.scenarios.split(","):
            kinds, layers = sc.split(":")
            file_dtype, load_dtype = (k.replace("bf16", "bfloat16").replace("fp32", "float32") for k in kinds.split("->"))
            ckpt = tmp / f"{file_dtype}-{layers}"
            env = dict(os.environ, PYTHONPATH=args.make_with)
            subprocess.run([sys.executable, "-c", MAKE, str(ckpt), layers, file_dtype], env=env, cwd=args.make_with,
                           check=True)
            file_bytes, largest = largest_file_tensor(ckpt)
            shards = len(list(ckpt.glob("*.safetensors")))
            for label, root in codes:
                for rep in range(args.repeats):
                    r = run(root, ckpt, load_dtype)
                    r.update(scenario=kinds, layers=int(layers), shards=shards, code=label, repeat=rep,
                             file_bytes=file_bytes, largest_file_tensor=largest)
                    r["peak_minus_base"] = r["peak_rss"] - r["base_rss"]
                    r["bound"] = r["model_bytes"] + largest
                    rows.append(r)
                    line = (f"{kinds:11s} {label:4s} file {file_bytes / GiB:.2f} GiB ({shards} shards)  "
                            f"peak-base {r['peak_minus_base'] / GiB:.2f} GiB  model {r['model_bytes'] / GiB:.2f} GiB  "
                            f"largest tensor {largest / GiB:.3f} GiB  peak/model {r['peak_minus_base'] / r['model_bytes']:.2f}  "
                            f"peak-(model+largest) {(r['peak_minus_base'] - r['bound']) / GiB:+.3f} GiB  "
                            f"load {r['load_s']:.1f}s  [{r['solotune']}]")
                    print(line, flush=True)
                    log.append(line)
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                           f"{platform.platform()}", "python": sys.version.split()[0],
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (args.out / "raw.log").write_text("\n".join([json.dumps(meta), *log]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
