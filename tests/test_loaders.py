"""The batches the loop trains on (experiments/data/loaders.py, experiments/training/distributed.py): where
trainer.max_steps cuts the run, the two shuffle orders against torch's own samplers, and a mid-epoch resume
that sees the batches an uninterrupted epoch sees, with loader workers too."""
import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, TensorDataset

from experiments.configuration.schema import ConfigError
from experiments.data.datasets import DataSplits
from experiments.data.loaders import build_loaders, first_batch, to_device
from experiments.training import distributed
from experiments.training.distributed import Context, EpochSampler


class Numbers(Dataset):
    """Item i: (a random draw, i): the draw comes from the process that loads it (a worker's own stream)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(1), i


def trainer(**over):
    return OmegaConf.create({"batch_size": 4, "eval_batch_size": None, "num_workers": 0, "shuffle": "per_epoch",
                             "drop_last": False, "epochs": 3, "max_steps": None, **over})


def loaders(**over):
    splits = DataSplits(train=Numbers(18), val=Numbers(5), test=Numbers(7), num_classes=2)
    return build_loaders(splits, trainer(**over), Context(), seed=3, device=torch.device("cpu"))


def labels(batches) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


@pytest.mark.parametrize("over, epochs, steps, last_epoch_batches", [
    ({}, 3, 15, 5),  # 18 images in batches of 4: 5 batches per epoch
    ({"drop_last": True}, 3, 12, 4),
    ({"max_steps": 7}, 2, 7, 2),  # the second epoch stops after its second batch
    ({"max_steps": 10}, 2, 10, 5),  # an epoch boundary
    ({"max_steps": 100}, 3, 15, 5),
])
def test_max_steps_cuts_the_run_in_one_place(over, epochs, steps, last_epoch_batches):
    run = loaders(**over)
    assert (run.epochs, run.steps) == (epochs, steps)
    assert len(list(run.train_epoch(epochs - 1))) == last_epoch_batches
    assert sum(len(list(run.train_epoch(e))) for e in range(run.epochs)) == steps
    assert len(list(run.train_epoch(epochs - 1, skip=1))) == last_epoch_batches - 1


def test_continued_shuffle_draws_from_one_generator_and_per_epoch_reseeds():
    """continued: epoch e's order is the (e+1)-th permutation of one generator seeded once (the pretraining
    recipe's); per_epoch: each epoch's from a generator seeded seed + epoch (DistributedSampler's rule)."""
    data = Numbers(10)
    continued, per_epoch = EpochSampler(data, Context(), 3, "continued"), EpochSampler(data, Context(), 3)
    stream = torch.Generator().manual_seed(3)
    orders = [torch.randperm(10, generator=stream).tolist() for _ in range(3)]
    for epoch in range(3):
        continued.set_epoch(epoch)
        per_epoch.set_epoch(epoch)
        assert list(continued) == orders[epoch]
        assert list(per_epoch) == torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
    continued.set_epoch(2, skip=3)
    assert list(continued) == orders[2][3:]  # a resume 3 samples into epoch 2
    assert orders[1] != orders[0]


@pytest.mark.parametrize("shuffle", ["per_epoch", "continued"])
def test_two_ranks_split_every_epoch_between_them(shuffle):
    data = Numbers(9)  # padded to 10: each rank gets 5
    shards = [EpochSampler(data, Context(rank, 2), 1, shuffle) for rank in range(2)]
    for epoch in range(2):
        for s in shards:
            s.set_epoch(epoch)
        a, b = (list(s) for s in shards)
        assert len(a) == len(b) == 5 and set(a) | set(b) == set(range(9))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", ["per_epoch", "continued"])
def test_a_resumed_epoch_sees_the_batches_of_an_uninterrupted_one(workers, shuffle):
    """With workers the random draws come from the workers' own streams; the skipped batches are loaded and
    dropped so those streams continue exactly."""
    def loader():
        sampler = EpochSampler(Numbers(20), Context(), 5, shuffle)
        return DataLoader(Numbers(20), 4, sampler=sampler, generator=sampler.generator, num_workers=workers)

    torch.manual_seed(0)
    whole = [list(distributed.epoch_batches(loader(), epoch)) for epoch in range(2)]
    torch.manual_seed(0)
    resumed = list(distributed.epoch_batches(loader(), 1, skip=2))
    assert len(resumed) == 3
    for (x, y), (x_whole, y_whole) in zip(resumed, whole[1][2:]):
        assert torch.equal(y, y_whole) and (workers == 0 or torch.equal(x, x_whole))


def test_batches_move_to_the_device_with_inputs_a_tensor_or_a_mapping():
    x, y = to_device(({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)}, torch.zeros(2)),
                     torch.device("cpu"))
    assert set(x) == {"input_ids", "attention_mask"} and y.shape == (2,)
    run = loaders(eval_batch_size=5)
    assert len(next(iter(run.val))[1]) == 5 and first_batch(run.train, run.device)[0].shape == (4, 1)
    assert list(itertools.chain(*labels(run.test))) == list(range(7))  # evaluation splits in order


def test_a_training_split_smaller_than_a_dropped_last_batch_is_refused_before_training():
    with pytest.raises(ConfigError) as info:
        loaders(batch_size=32, drop_last=True)  # 18 images, no full batch of 32
    assert str(info.value) == ("trainer.batch_size=32: with trainer.drop_last=true leaves no training batch of the 18 "
                               "training images. Fix: trainer.batch_size=18 or less, or trainer.drop_last=false")
    assert loaders(batch_size=32).steps == 3  # the one short batch of each epoch trains


def test_an_evaluation_draws_nothing_from_the_global_random_stream():
    """So an extra evaluation (a run cut by trainer.max_steps, then resumed) leaves the training after it as it
    would have been: the dropout and flips that follow draw the same numbers. (Without a generator of its own, a
    DataLoader draws its workers' base seed from the global stream each time it is iterated.)"""
    fixed = TensorDataset(torch.arange(6.0), torch.arange(6))
    splits = DataSplits(train=Numbers(18), val=fixed, test=fixed, num_classes=6)
    built = build_loaders(splits, trainer(), Context(), seed=3, device=torch.device("cpu"))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for loader in (built.val, built.test):
        assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5]]
    assert torch.equal(torch.get_rng_state(), before)
    list(DataLoader(fixed, 4))
    assert not torch.equal(torch.get_rng_state(), before)  # what a plain DataLoader does
