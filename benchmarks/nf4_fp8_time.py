"""Time the NF4 -> e4m3 conversion kernel's tile shapes and forms on the GPU (one 7B w1 [11008, 4096] and a
wq [4096, 4096]), both layouts, against the bandwidth floor (0.5 B read + 1 B written per weight) and the
bf16 dequantization kernel. Prints one line per variant; the fastest is the default. (The run in
benchmarks/results/frontier6-h200/run2/ also timed an IEEE division per value instead of the multiply by the
stored reciprocal, on the tree of commit 03b5e4f: twice as slow; the division form is gone since.)

    python3 benchmarks/nf4_fp8_time.py
"""
import itertools
import time

import torch

from solotune.quant import quantize_nf4
from solotune.quant.dequant import dequantize_nf4
from solotune.quant.nf4_fp8 import nf4_row_scales, nf4_to_fp8_torch
from solotune.quant.triton_nf4 import nf4_to_fp8_triton


def timed(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


for shape in [(11008, 4096), (4096, 4096)]:
    q = quantize_nf4(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02)
    _, inv = nf4_row_scales(q)
    n = shape[0] * shape[1]
    dt = timed(lambda: dequantize_nf4(q, torch.bfloat16))
    print(f"{shape} bf16 dequantize: {dt * 1e6:.1f} us ({n * 2.5 / dt / 1e12:.2f} TB/s)")
    refs = {t: nf4_to_fp8_torch(q, inv, t).view(torch.uint8) for t in (False, True)}
    for (br, bc), warps, tr in itertools.product([(64, 64), (32, 128), (64, 128), (128, 128), (16, 256)],
                                                  [4, 8], [False, True]):
        try:
            fn = lambda: nf4_to_fp8_triton(q, inv, tr, block=(br, bc), num_warps=warps)
            dt = timed(fn)
            same = float((fn().view(torch.uint8) == refs[tr]).float().mean())
        except Exception as e:  # a tile too large for the registers
            print(f"{shape} block {br}x{bc} warps {warps} transpose {tr}: failed {type(e).__name__}")
            continue
        print(f"{shape} block {br}x{bc} warps {warps} transpose {tr}: {dt * 1e6:.1f} us "
              f"({n * 1.5 / dt / 1e12:.2f} TB/s) equal {same:.6f}")
