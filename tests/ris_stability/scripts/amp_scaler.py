"""An outside-style fp16 training script: a GradScaler whose first steps overflow, the loss scaled before
backward, no ris_stability import."""
import argparse
import torch
from torch import nn
p = argparse.ArgumentParser(); p.add_argument("--steps", type=int, default=12); args = p.parse_args()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
for step in range(args.steps):
    x = torch.randn(32, 8); y = torch.randint(0, 4, (32,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True)
