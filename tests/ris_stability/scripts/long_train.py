"""A long, plain training loop for the signal and fault tests (issue #30): writes ARGV[1] once
ARGV[2] steps are done (the test then signals it), and runs until killed or ARGV[3] steps.
With ``--own-handler`` it installs its own SIGTERM handler and ends its loop cleanly on it; with the
environment variable RIS_TEST_PROGRESS it appends each finished step's number to that file."""
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

ready, after, total = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
stop = []
progress = open(os.environ["RIS_TEST_PROGRESS"], "a") if os.environ.get("RIS_TEST_PROGRESS") else None
if "--own-handler" in sys.argv:
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(16, 6), torch.randn(16, 1)
for step in range(total):
    opt.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    if progress is not None:
        progress.write(f"{step + 1}\n")
        progress.flush()
    if step + 1 == after:
        ready.write_text(str(step + 1))
    if stop:
        print(f"own handler: stopped cleanly at step {step + 1}")
        break
    time.sleep(0.005)
