"""ms per forward+backward of the MoE layer vs the dense ReLU² MLP (B=4, T=512, C=256, E=8, k=2) on CPU.

python benchmarks/moe_dispatch.py [threads] [reps]: the variants are timed round-robin (one rep of each in turn,
so load from other processes hits all alike); medians after 5 warm-up rounds, and each median
as a multiple of the dense MLP's in the same dtype."""
import contextlib, statistics, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
from rdn.model.moe import MoE, MoEConfig

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
torch.set_num_threads(threads)
B, T, C = 4, 512, 256

class Dense(nn.Module):
    def __init__(s):
        super().__init__(); s.c_fc = nn.Linear(C, 4 * C, bias=False); s.c_proj = nn.Linear(4 * C, C, bias=False)
    def forward(s, x): return s.c_proj(F.relu(s.c_fc(x)).square())

x = torch.randn(B, T, C, requires_grad=True)
g = torch.randn(B, T, C)

def once(mod, bf16):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t = time.perf_counter()
    with ctx:
        y = mod(x); loss = (y.float() * g).sum()
        if getattr(mod, "aux_loss", None) is not None: loss = loss + mod.aux_loss
    loss.backward()
    if isinstance(mod, MoE): mod.update_bias()
    return time.perf_counter() - t

torch.manual_seed(0)
variants = [("dense MLP, hidden 1024", Dense(), "fp32"), ("dense MLP, hidden 1024", Dense(), "bf16")]
for shared in (1, 0):
    for dispatch, modes in (("loop", ("fp32", "bf16")), ("grouped_mm", ("bf16",))):
        for mode in modes:
            m = MoE(C, MoEConfig(enabled=True, num_experts=8, top_k=2, num_shared=shared))
            nn.init.normal_(m.w_proj, std=0.02)
            m.dispatch = dispatch
            variants.append((f"MoE H=512 shared={shared} {dispatch}", m, mode))
times = [[] for _ in variants]
for r in range(5 + reps):
    for i, (_, mod, mode) in enumerate(variants):
        dt = once(mod, mode == "bf16")
        if r >= 5:
            times[i].append(dt)
med = [1e3 * statistics.median(t) for t in times]
dense = {mode: med[i] for i, (_, _, mode) in enumerate(variants[:2])}
print(f"torch {torch.__version__}, {threads} thread(s), {reps} reps")
for (name, _, mode), ms in zip(variants, med):
    print(f"{name:34s} {mode}  {ms:7.1f} ms  x{ms / dense[mode]:.2f}")
