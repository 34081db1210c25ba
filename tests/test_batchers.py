"""Tests of colm.procedures.batchers: reproducibility, resume and task mixing."""

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from colm.datasets.dataset import Dataset
from colm.procedures.batchers import MultiTaskBatcher, SingleTaskBatcher, dataset_probabilities


class NumberDataset(Dataset):
    """Example i has input_str str(i)."""

    def __init__(self, name, size, batch_size):
        self.size = size
        super().__init__(name=name, split="train", batch_size=batch_size)

    def load_data(self):
        self.examples = [{"input_str": str(i), "target_str": "t", "answer_choices": []} for i in range(self.size)]


def numbers(batch):
    return [int(s) for s in batch["input_str"]]


def single(shuffle=True, drop_last=False, seed=0, **kwargs):
    batcher = SingleTaskBatcher(shuffle=shuffle, drop_last=drop_last, **kwargs)
    batcher.set_tokenizer(ByT5Tokenizer())
    batcher.set_seed(seed)
    return batcher


def epoch_numbers(batcher, datasets, epoch, start_batch=0):
    return [numbers(b) for b in batcher.iterate(datasets, epoch, start_batch)]


def test_single_epoch_covers_dataset_and_is_reproducible():
    data = [NumberDataset("d", 10, 3)]
    batcher = single()
    epoch0 = epoch_numbers(batcher, data, 0)
    assert [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert sorted(sum(epoch0, [])) == list(range(10))
    assert epoch0 != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert epoch_numbers(single(), data, 0) == epoch0  # fresh batcher, same seed
    assert epoch_numbers(batcher, data, 1) != epoch0  # reshuffled each epoch
    assert epoch_numbers(single(seed=1), data, 0) != epoch0
    assert batcher.epoch_length(data) == 4


def test_single_drop_last_no_shuffle_and_build():
    data = [NumberDataset("d", 10, 3)]
    batcher = single(shuffle=False, drop_last=True)
    assert epoch_numbers(batcher, data, 5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    loader = batcher.build(data)
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 3
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 2) and batch["dataset_name"] == ["d"] * 3
    with pytest.raises(ValueError, match="one dataset"):
        batcher.build([NumberDataset("a", 4, 2), NumberDataset("b", 4, 2)])


def test_single_endless_resumes_mid_epoch():
    data = [NumberDataset("d", 7, 2)]
    batcher = single()
    stream = batcher.endless(data, start_epoch=1, start_batch=2)
    got = [next(stream) for _ in range(3)]
    epoch1, epoch2 = epoch_numbers(batcher, data, 1), epoch_numbers(batcher, data, 2)
    assert [(e, i) for e, i, _ in got] == [(1, 2), (1, 3), (2, 0)]
    assert [numbers(b) for _, _, b in got] == [epoch1[2], epoch1[3], epoch2[0]]
    assert epoch_numbers(batcher, data, 1, start_batch=2) == epoch1[2:]


def test_single_workers_match_in_process():
    data = [NumberDataset("d", 9, 4)]
    assert epoch_numbers(single(num_workers=1), data, 3) == epoch_numbers(single(), data, 3)


def test_dataset_probabilities_formula():
    assert np.allclose(dataset_probabilities([1, 3]), [0.25, 0.75])
    # (1/4)^(1/2) = 0.5 and (3/4)^(1/2) = 0.866..., normalised
    assert np.allclose(dataset_probabilities([1, 3], temperature=2), [0.5 / 1.3660254, 0.8660254 / 1.3660254])
    assert np.allclose(dataset_probabilities([1, 1000], temperature=1e6), [0.5, 0.5], atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        dataset_probabilities([1, 2], temperature=0)
    with pytest.raises(ValueError, match="sizes"):
        dataset_probabilities([0, 0])


def multi(seed=0, **kwargs):
    batcher = MultiTaskBatcher(shuffle=True, **kwargs)
    batcher.set_tokenizer(ByT5Tokenizer())
    batcher.set_seed(seed)
    return batcher


def test_multi_frequencies_follow_formula():
    data = [NumberDataset("big", 400, 4), NumberDataset("mid", 100, 4), NumberDataset("small", 40, 4)]
    batcher = multi(temperature=2.0)
    assert batcher.epoch_length(data) == 100 + 25 + 10
    counts = np.zeros(3)
    for epoch in range(20):
        plan = batcher.plan_epoch(data, epoch)
        assert len(plan) == 135
        counts += np.bincount([d for d, _ in plan], minlength=3)
    expected = dataset_probabilities([400, 100, 40], 2.0) * counts.sum()
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 13.8  # 2 degrees of freedom, p = 0.001
    # temperature 1 would give a clearly different mix
    proportional = dataset_probabilities([400, 100, 40], 1.0) * counts.sum()
    assert ((counts - proportional) ** 2 / proportional).sum() > 13.8


def test_multi_batches_come_from_one_dataset_with_its_batch_size():
    data = [NumberDataset("a", 12, 3), NumberDataset("b", 10, 5)]
    batcher = multi()
    batches = list(batcher.iterate(data, 0))
    assert len(batches) == 4 + 2
    for batch in batches:
        names = set(batch["dataset_name"])
        assert len(names) == 1
        assert len(batch["input_str"]) == (3 if names == {"a"} else 5)


def test_multi_seeded_reshuffle_is_reproducible():
    # "small" is drawn about as often as "big" but has 2 batches per pass, so it
    # is reshuffled many times within an epoch.
    data = [NumberDataset("big", 400, 4), NumberDataset("small", 8, 4)]
    plan = multi(mixing_ratio=[1, 1]).plan_epoch(data, 0)
    small = [idx.tolist() for d, idx in plan if d == 1]
    assert len(small) > 20
    assert all(sorted(small[k] + small[k + 1]) == list(range(8)) for k in range(0, len(small) - 1, 2))
    assert len({tuple(b) for b in small}) > 2  # passes differ
    again = multi(mixing_ratio={"big": 1, "small": 1}).plan_epoch(data, 0)
    assert [(d, idx.tolist()) for d, idx in again] == [(d, idx.tolist()) for d, idx in plan]
    other = multi(seed=5, mixing_ratio=[1, 1]).plan_epoch(data, 0)
    assert [(d, idx.tolist()) for d, idx in other] != [(d, idx.tolist()) for d, idx in plan]


def test_multi_endless_resume_matches_iterate():
    data = [NumberDataset("a", 12, 3), NumberDataset("b", 10, 5)]
    batcher = multi()
    stream = batcher.endless(data, start_epoch=2, start_batch=5)
    got = [next(stream) for _ in range(2)]
    assert [(e, i) for e, i, _ in got] == [(2, 5), (3, 0)]
    assert numbers(got[0][2]) == numbers(list(batcher.iterate(data, 2))[5])
    assert numbers(got[1][2]) == numbers(next(iter(batcher.iterate(data, 3))))


def test_multi_errors():
    with pytest.raises(ValueError, match="'tiny'"):
        multi().plan_epoch([NumberDataset("tiny", 2, 4), NumberDataset("b", 8, 4)], 0)
    with pytest.raises(KeyError, match="'b'"):
        multi(mixing_ratio={"a": 1}).plan_epoch([NumberDataset("a", 8, 4), NumberDataset("b", 8, 4)], 0)
    with pytest.raises(ValueError, match="3 entries"):
        multi(mixing_ratio=[1, 1, 1]).plan_epoch([NumberDataset("a", 8, 4), NumberDataset("b", 8, 4)], 0)
