"""ESPRIT-style subspace step (a well-known subspace-method codebase): eig, signal subspace, pinv, and the eig of
the rotation with its eigenvectors unused (their gradient is None in backward). Issue #30."""
import torch
from torch import nn
torch.manual_seed(0)
lin = nn.Linear(8, 8); opt = torch.optim.SGD(lin.parameters(), lr=1e-3); x = torch.randn(4, 8, 8)
for step in range(3):
    opt.zero_grad()
    A = lin(x); R = A @ A.transpose(-1, -2) + torch.eye(8)
    w, V = torch.linalg.eig(R.to(torch.complex64))
    Us = V[..., :3]
    phi = torch.linalg.pinv(Us[..., :-1, :]) @ Us[..., 1:, :]
    pw, _ = torch.linalg.eig(phi)
    loss = pw.angle().abs().sum(); loss.backward(); opt.step()
