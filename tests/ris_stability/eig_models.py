"""Outside-style models for the beyond-NaN tests (no ris_model): a learned Hermitian covariance whose
projector loss goes through ``torch.linalg.eig`` in complex64, one sample at a time in a Python loop
(the shape of learned root-MUSIC / ESPRIT networks); a convolution that can overflow in front of an
eig; a companion-matrix eigvals; a harmless pinv; a Hermitian eig."""
from __future__ import annotations

import torch
from torch import nn

N, R, K, D = 8, 3, 2, 6


class FactorNet(nn.Module):
    """x (B, D) -> complex factors F (B, N, R); the covariance is scale * F F^H (Hermitian by construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(D, 16)
        self.head = nn.Linear(16, 2 * N * R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(torch.tanh(self.enc(x))).view(-1, N, R, 2)
        return torch.complex(f[..., 0], f[..., 1])


class ProjectorLoss(nn.Module):
    """Phase-invariant loss ||V_K V_K^H - P_target||_F^2 on the top-K eigenvectors of each sample's
    covariance, ``torch.linalg.eig`` per sample (a general-matrix solver on a Hermitian input)."""

    def __init__(self, dtype: torch.dtype = torch.complex64) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, F: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.new_zeros((), dtype=torch.float32)
        for b in range(F.shape[0]):
            cov = scale[b] * (F[b] @ F[b].mH)
            w, V = torch.linalg.eig(cov.to(self.dtype))
            top = V[:, w.real.argsort(descending=True)[:K]]  # eig's order is unspecified
            P = (top @ top.mH).to(target.dtype)
            total = total + (P - target[b]).abs().square().sum().to(total.dtype)
        return total / F.shape[0]


def make_batch(scale: float, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs, per-sample scale (the 'SNR': covariance eigenvalues grow as scale) and target projectors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, generator=g)
    t = torch.randn(batch, N, K, dtype=torch.complex64, generator=g)
    q, _ = torch.linalg.qr(t)
    return {"x": x, "scale": torch.full((batch,), float(scale)), "target": q @ q.mH}


def eig_setup(seed: int = 0) -> tuple[FactorNet, ProjectorLoss]:
    torch.manual_seed(seed)
    return FactorNet(), ProjectorLoss()


def eig_loss(net: FactorNet, loss_fn: ProjectorLoss, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return loss_fn(net(batch["x"]), batch["scale"], batch["target"])


class ConvEig(nn.Module):
    """A convolution whose output overflows to inf for huge inputs, then an eigvals per sample (which
    raises on the non-finite matrix); ``empty_like`` + ``copy_`` in between must not count as an origin."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        z = torch.empty_like(h)
        z.copy_(h)
        s = z.sum(1)
        A = torch.diag_embed(s) + torch.ones(s.shape[-1], s.shape[-1])
        return torch.stack([torch.linalg.eigvals(A[b]) for b in range(A.shape[0])]).real.sum()


class CompanionRoots(nn.Module):
    """Roots of a learned monic polynomial by eigvals of its companion matrix (|det| = |c_0| = 1)."""

    def __init__(self, degree: int = 14) -> None:
        super().__init__()
        # Roots in conjugate pairs at radii 0.03..30 (|prod| = 1): well separated, but coefficients up to
        # ~1e6, so the companion matrix's condition number (~1e12) is far beyond float32's 1e6. Nothing
        # inverts it: eigvals of it is harmless.
        radii = torch.logspace(-1.5, 1.5, degree // 2, dtype=torch.float64)
        radii = radii / radii.prod() ** (1 / len(radii))
        angles = torch.linspace(0.3, 2.8, degree // 2, dtype=torch.float64)
        roots = torch.polar(radii, angles)
        poly = torch.ones(1, dtype=torch.complex128)
        for r in torch.cat([roots, roots.conj()]):
            poly = torch.cat([poly, torch.zeros(1, dtype=poly.dtype)]) - r * torch.cat([torch.zeros(1, dtype=poly.dtype), poly])
        self.coef = nn.Parameter(poly.real[1:].to(torch.float32))  # z^n + c_{n-1} z^{n-1} + ... + c_0
        self.degree = degree

    def forward(self) -> torch.Tensor:
        n = self.degree
        top = -self.coef.unsqueeze(0)
        comp = torch.cat([top, torch.eye(n - 1, n)], dim=0)
        roots = torch.linalg.eigvals(comp)
        return (roots.abs() - 1).square().sum()


class PinvHead(nn.Module):
    """Least-squares readout through pinv of a well-conditioned learned matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.eye(6) + 0.1 * torch.randn(6, 6))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.linalg.pinv(self.A) @ y).square().sum()


class HermitianEig(nn.Module):
    """eig of a Hermitian matrix built as B B^H + I (eigh would do)."""

    def __init__(self) -> None:
        super().__init__()
        self.B = nn.Parameter(torch.randn(6, 3))

    def forward(self) -> torch.Tensor:
        A = self.B @ self.B.T + torch.eye(6)
        w, V = torch.linalg.eig(A)
        return (V[:, :2].abs() ** 2).sum() + w.real.sum()


class ReplayedEigStep:
    """What ``risdiag bisect`` needs of a replayed step: the model, its roots and the step's loss."""

    def __init__(self, net: FactorNet, loss_fn: ProjectorLoss, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.loss_fn, self.batch = net, loss_fn, batch
        self.roots = {"model": net, "loss": loss_fn}

    def loss(self) -> torch.Tensor:
        return eig_loss(self.model, self.loss_fn, self.batch)


def replay(capsule, dtype: str | None = None) -> ReplayedEigStep:
    """Replayer of capsules written by a monitor around eig_loss (``batch_state`` default: {"batch": b})."""
    net, loss_fn = eig_setup()
    net.load_state_dict(capsule.model_state)
    batch = dict(capsule.batch["batch"])
    if dtype == "float64":
        net.double()
        loss_fn = ProjectorLoss(torch.complex128)
        batch = {k: v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in batch.items()}
    return ReplayedEigStep(net, loss_fn, batch)
