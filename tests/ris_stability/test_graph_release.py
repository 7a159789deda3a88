"""The monitor keeps a step's loss value, not its autograd graph: once the loop drops its loss, the graph is
freed where it would be without the monitor (freeing it in the monitor's next step made the loop's own cost
look like the monitor's)."""
import gc
import weakref

import torch

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor


class _Marker:
    pass


class _Tagged(torch.autograd.Function):
    """Identity whose graph node holds a Python object: alive exactly as long as the node is."""

    @staticmethod
    def forward(ctx, x, marker):
        ctx.marker = marker
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_the_graph_is_freed_when_the_loop_drops_its_loss(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with MonitorSession(StabilityMonitor(tmp_path / "run", MonitorConfig(every=2)), model, opt) as s:
        for step in range(3):
            s.start_step(step)
            opt.zero_grad()
            marker = _Marker()
            alive = weakref.ref(marker)
            loss = _Tagged.apply(model(torch.randn(3, 4)), marker).pow(2).mean()
            del marker
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
            value = loss.item()
            del loss
            gc.collect()
            assert alive() is None, f"step {step}: the monitor still holds the loss's graph"
            assert s.ctx.loss is not None and s.ctx.loss.item() == value  # its value is kept


def test_under_watch_too(tmp_path):
    from ris_stability import watch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, out=tmp_path, report=False, every=2):
        for step in range(3):
            opt.zero_grad()
            marker = _Marker()
            alive = weakref.ref(marker)
            loss = _Tagged.apply(model(torch.randn(3, 4)), marker).pow(2).mean()
            del marker
            loss.backward()
            opt.step()
            del loss
            gc.collect()
            assert alive() is None, f"step {step}: the monitor still holds the loss's graph"
