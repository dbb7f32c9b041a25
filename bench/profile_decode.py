"""Temporary: where does a compiled decode step spend its GPU time?"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import random_model, cuda_time, median
from lit_adapter.config import Config
from lit_adapter.generation import decode_one_token

mode = sys.argv[1]
config = Config.from_name("llama-7b")
model = random_model(config, adapter=True).eval()
model.set_kv_cache(1, 232)
with torch.no_grad():
    model(torch.randint(0, 32000, (1, 32), device="cuda"), torch.arange(32, device="cuda"))
opts = {"coordinate_descent_tuning": True}
if "roc" in mode:
    opts["realize_opcount_threshold"] = int(mode.split("roc")[1])
step = torch.compile(decode_one_token, fullgraph=True, options=opts)
tok = torch.zeros(1, 1, dtype=torch.long, device="cuda"); pos = torch.tensor([40], device="cuda")
t0 = time.perf_counter()
with torch.no_grad():
    for _ in range(3): step(model, tok, pos, 0.0, None, 1.0)
torch.cuda.synchronize(); print("compile", time.perf_counter() - t0)
with torch.no_grad():
    t = median(cuda_time(lambda: step(model, tok, pos, 0.0, None, 1.0), 20))
print(f"RESULT {mode}: no-graph step {t*1e3:.2f} ms")
from torch.profiler import profile, ProfilerActivity
with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5): step(model, tok, pos, 0.0, None, 1.0)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
