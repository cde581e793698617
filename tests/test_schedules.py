"""The `scheduler` group (experiments/training/schedules.py), stepped by the loop after every optimizer step:
the paper's cosine moves once per epoch exactly as torch's CosineAnnealingLR stepped per epoch does, and
resumes mid-epoch; the pretraining schedule warms up linearly, then decays to its floor."""
import pytest
import torch

from experiments.training import schedules


def sgd(lr: float = 0.5) -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The lr of each of `steps` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_moves_once_per_epoch_as_torchs_per_epoch_scheduler():
    optimizer, reference = sgd(), sgd()
    per_epoch = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4, eta_min=0.1 * 0.5)
    expected = []
    for _ in range(4):
        expected += [reference.param_groups[0]["lr"]] * 3
        reference.step()
        per_epoch.step()
    assert lrs(optimizer, schedules.cosine(optimizer, steps_per_epoch=3, epochs=4, min_lr_ratio=0.1), 12) == expected
    assert expected[0] == 0.5 and expected[-1] > 0.05 and len(set(expected)) == 4


def test_cosine_resumed_mid_epoch_continues_exactly():
    optimizer = sgd()
    whole = lrs(optimizer, schedules.cosine(optimizer, 3, 4, 0.1), 12)
    first = sgd()
    scheduler = schedules.cosine(first, 3, 4, 0.1)
    lrs(first, scheduler, 5)  # a checkpoint mid-epoch 2
    resumed = sgd()
    again = schedules.cosine(resumed, 3, 4, 0.1)
    resumed.load_state_dict(first.state_dict())
    again.load_state_dict(scheduler.state_dict())
    assert lrs(resumed, again, 7) == whole[5:]


def test_warmup_cosine_warms_up_then_decays_to_its_floor():
    optimizer = sgd(lr=2.0)
    seen = lrs(optimizer, schedules.warmup_cosine(optimizer, steps_per_epoch=10, epochs=10, warmup_epochs=1,
                                                  min_lr_ratio=0.01), 100)
    assert seen[0] == pytest.approx(2.0 / 10) and seen[9] == pytest.approx(2.0)  # 10 warm-up steps
    assert seen[10] == seen[9] and all(a > b for a, b in zip(seen[10:], seen[11:]))  # the cosine starts at 1
    assert seen[-1] == pytest.approx(2.0 * (0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(89 / 90 * torch.pi)))))
