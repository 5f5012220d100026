"""The host-sync counter (tests/host_syncs.py) sees every way a step can read a tensor on the host."""
import torch

from host_syncs import HostSyncCounter, syncs_per_step


def test_counter_sees_each_kind_of_host_read_and_names_the_line():
    x = torch.randn(4, 3)
    reads = [
        lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: float(x.max()), lambda: int(x.argmax()),
        lambda: x.tolist(), lambda: x.numpy(), lambda: x.cpu(), lambda: x.nonzero(),
        lambda: x[x > 0], lambda: x.masked_select(x > 0), lambda: torch.unique(x),
    ]
    for read in reads:
        with HostSyncCounter() as counter:
            read()
        assert counter.events, read
        assert all("test_host_syncs.py" in event for event in counter.events), counter.events


def test_device_side_work_is_not_counted():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # reads its host-side step counter
    x = torch.randn(4, 3)
    with HostSyncCounter() as counter:
        loss = model(x).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        kept = torch.where(x > 0, x, torch.zeros_like(x)).sum()
        x[:, :2].index_copy_(0, torch.tensor([1]), x[:1, :2])
    assert counter.events == []
    assert kept.ndim == 0


def test_syncs_per_step_keeps_only_what_grows_with_the_steps():
    x = torch.randn(3)

    def run(steps):
        x.sum().item()  # once per run: set-up
        for _ in range(steps):
            x.max().item()  # every step
    per_step = syncs_per_step(run, steps=(2, 5))
    assert list(per_step.values()) == [1.0]
    assert "run" in next(iter(per_step))
