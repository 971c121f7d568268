import torch, time
from solotune.quant import quantize_nf4
from solotune.quant.dequant import dequantize_nf4
w = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
q = quantize_nf4(w)
for backend in ("torch", "triton"):
    for _ in range(3): dequantize_nf4(q, torch.bfloat16, backend=backend)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): dequantize_nf4(q, torch.bfloat16, backend=backend)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
    print(f"dequant {backend}: {dt*1e3:.3f} ms for 45M params = {w.numel()*2.5/dt/1e12:.2f} TB/s effective")
x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): x @ w.T
torch.cuda.synchronize(); print(f"bf16 matmul 128x4096x11008: {(time.perf_counter()-t)/20*1e3:.3f} ms")
