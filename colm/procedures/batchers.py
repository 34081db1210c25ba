"""Batchers: turn datasets into reproducible streams of collated batches.

An epoch is planned up front as a list of (dataset index, example indices), from
a generator seeded by (seed, epoch) only. So the batches of any epoch can be
rebuilt exactly, and a resumed run can start at (epoch, batch index) without
reading the skipped batches. Loading and collating run in a DataLoader (one item
per planned batch, so workers, if any, build whole batches) with its own seeded
generator, so iterating never draws from torch's global RNG: the Trainer's resume
(colm/procedures/resume.py) restores that RNG and continues bit for bit.

Under torchrun every rank plans the same epoch (same seed) and keeps its part of it (docs/distributed.md):
- `split=(rank, world)` (training): every planned batch is cut into `world` contiguous pieces and the rank
  keeps piece `rank`, so the world's pieces together are exactly the configured batch of one process;
- `stride=(rank, world)` (evaluation): the rank keeps whole batches rank, rank + world, ..., so every batch
  is the one a single process would run, padding included, and its outputs are the same.
"""

import collections

import gin
import numpy as np
import torch


def _dataset_list(datasets):
    if isinstance(datasets, dict):
        return list(datasets.values())
    if isinstance(datasets, (list, tuple)):
        return list(datasets)
    return [datasets]


def _num_batches(size, batch_size, drop_last):
    return size // batch_size if drop_last else -(-size // batch_size)


def dataset_probabilities(sizes, temperature=1.0):
    """Sampling probability of each dataset: proportional to (size/total)^(1/temperature)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if sizes.size == 0 or (sizes < 0).any() or sizes.sum() <= 0:
        raise ValueError(f"Dataset sizes must be non-negative with a positive total; got {sizes.tolist()}.")
    weights = (sizes / sizes.sum()) ** (1.0 / temperature)
    return weights / weights.sum()


class _PlannedBatches(torch.utils.data.Dataset):
    """Item k is planned batch k, collated by its own dataset."""

    def __init__(self, datasets, plan):
        self.datasets = datasets
        self.plan = plan

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, k):
        dataset = self.datasets[self.plan[k][0]]
        return dataset.collate([dataset[int(i)] for i in self.plan[k][1]])


def _identity(batch):
    return batch


class _Batcher:
    def __init__(self, shuffle, drop_last, num_workers=0):
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.seed = 42
        self.tokenizer = None

    def set_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer

    def set_seed(self, seed):
        self.seed = int(seed)

    def _generator(self, epoch):
        # Mix (seed, epoch) instead of adding them, so seed s epoch e+1 does not
        # replay seed s+1 epoch e.
        state = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def _prepare(self, datasets):
        datasets = _dataset_list(datasets)
        if not datasets:
            raise ValueError(f"{type(self).__name__} got no datasets.")
        for d in datasets:
            if self.tokenizer is not None:
                d.set_tokenizer(self.tokenizer)
            if not isinstance(d.batch_size, int) or d.batch_size < 1:
                raise ValueError(f"Dataset {d.name!r} has batch_size={d.batch_size!r}; set a positive integer.")
        return datasets

    def _batches_of(self, dataset, generator):
        """One pass over a dataset: its (shuffled) indices cut into batches."""
        size = len(dataset)
        order = torch.randperm(size, generator=generator) if self.shuffle else torch.arange(size)
        batches = list(torch.split(order, dataset.batch_size))
        if self.drop_last and batches and len(batches[-1]) < dataset.batch_size:
            batches.pop()
        return batches

    def plan_epoch(self, datasets, epoch):
        """List of (dataset index, example index tensor), one per batch of the epoch."""
        raise NotImplementedError

    def epoch_length(self, datasets):
        return sum(_num_batches(len(d), d.batch_size, self.drop_last) for d in self._prepare(datasets))

    def check_split(self, datasets, world):
        """Refuses a batch size that `world` ranks cannot share equally, naming the binding to change."""
        for d in self._prepare(datasets):
            if d.batch_size % world:
                raise ValueError(
                    f"{d.name}: batch_size={d.batch_size} cannot be split over {world} processes (torchrun "
                    f"--nproc_per_node x nodes). The batch size is the effective one of all processes together: "
                    f"bind {d.name}/{type(d).__name__}.batch_size to a multiple of {world}, or change the number "
                    "of processes.")

    def loader(self, datasets, epoch=0, start_batch=0, split=None, stride=None):
        """DataLoader over the batches of `epoch`, from batch `start_batch` on (of the whole plan); `split` or
        `stride` = (rank, world) keeps this rank's part (module docstring)."""
        datasets = self._prepare(datasets)
        plan = self.plan_epoch(datasets, epoch)[start_batch:]
        if split is not None and split[1] > 1:
            rank, world = split
            pieces = [(d, torch.tensor_split(indices, world)[rank]) for d, indices in plan]
            if any(len(indices) == 0 for _, indices in pieces):
                raise ValueError(f"{type(self).__name__}: a batch of epoch {epoch} has fewer examples than the "
                                 f"{world} processes sharing it (the last, short batch of drop_last=False); set "
                                 "drop_last=True for training under torchrun.")
            plan = pieces
        if stride is not None:
            plan = plan[stride[0]::stride[1]]
        return torch.utils.data.DataLoader(
            _PlannedBatches(datasets, plan),
            batch_size=None,  # items are already batches
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
            # Its own generator: a DataLoader iterator otherwise draws its worker seed from torch's global RNG,
            # so a resumed run (which starts an iterator mid-epoch) would see other dropout masks.
            generator=self._generator(epoch),
        )

    def build(self, datasets):
        """Batches of one pass (epoch 0), e.g. for evaluation."""
        return self.loader(datasets, epoch=0)

    def iterate(self, datasets, epoch, start_batch=0, split=None, stride=None):
        """Yields the batches of one epoch, starting at batch index start_batch."""
        yield from self.loader(datasets, epoch, start_batch, split=split, stride=stride)

    def endless(self, datasets, start_epoch=0, start_batch=0, split=None):
        """Yields (epoch, batch index, batch) forever, from (start_epoch, start_batch); the batch index counts
        the planned batches, the same on every rank, so a resume position holds for any split."""
        datasets = self._prepare(datasets)
        if self.epoch_length(datasets) == 0:
            raise ValueError(
                f"{type(self).__name__}: an epoch has no batches (datasets smaller than their "
                "batch_size with drop_last=True); lower batch_size or set drop_last=False."
            )
        epoch = start_epoch
        while True:
            for index, batch in enumerate(self.loader(datasets, epoch, start_batch, split=split), start=start_batch):
                yield epoch, index, batch
            epoch, start_batch = epoch + 1, 0


@gin.configurable
class SingleTaskBatcher(_Batcher):
    """Batches of exactly one dataset, reshuffled every epoch if shuffle."""

    def __init__(self, shuffle, drop_last, num_workers=0):
        super().__init__(shuffle, drop_last, num_workers)

    def _prepare(self, datasets):
        datasets = super()._prepare(datasets)
        if len(datasets) != 1:
            raise ValueError(
                f"SingleTaskBatcher takes one dataset, got {len(datasets)} "
                f"({[d.name for d in datasets]}); use MultiTaskBatcher."
            )
        return datasets

    def plan_epoch(self, datasets, epoch):
        dataset = self._prepare(datasets)[0]
        return [(0, b) for b in self._batches_of(dataset, self._generator(epoch))]


@gin.configurable
class MultiTaskBatcher(_Batcher):
    """Each batch comes from one dataset, drawn at random per batch.

    Dataset i is drawn with probability proportional to (size_i/total)^(1/temperature),
    or to mixing_ratio[i] (a list in dataset order, or a dict by dataset name).
    An epoch has sum_i size_i // batch_size_i batches; a dataset drawn more often
    than it has batches is reshuffled (with the epoch's seeded generator).
    """

    def __init__(self, shuffle, drop_last=True, num_workers=0, temperature=1.0, mixing_ratio=None):
        super().__init__(shuffle, drop_last, num_workers)
        self.temperature = temperature
        self.mixing_ratio = mixing_ratio

    def probabilities(self, datasets):
        datasets = _dataset_list(datasets)
        if self.mixing_ratio is None:
            return dataset_probabilities([len(d) for d in datasets], self.temperature)
        ratio = self.mixing_ratio
        if isinstance(ratio, dict):
            missing = [d.name for d in datasets if d.name not in ratio]
            if missing:
                raise KeyError(f"mixing_ratio has no entry for datasets {missing}; it has {sorted(ratio)}.")
            ratio = [ratio[d.name] for d in datasets]
        if len(ratio) != len(datasets):
            raise ValueError(f"mixing_ratio has {len(ratio)} entries for {len(datasets)} datasets.")
        return dataset_probabilities(ratio, temperature=1.0)

    def plan_epoch(self, datasets, epoch):
        datasets = self._prepare(datasets)
        for d in datasets:
            if _num_batches(len(d), d.batch_size, self.drop_last) == 0:
                raise ValueError(
                    f"Dataset {d.name!r} ({len(d)} examples) has no full batch of {d.batch_size}; "
                    "lower its batch_size or set drop_last=False."
                )
        generator = self._generator(epoch)
        queues = [collections.deque(self._batches_of(d, generator)) for d in datasets]
        probs = torch.tensor(self.probabilities(datasets), dtype=torch.float64)
        draws = torch.multinomial(probs, self.epoch_length(datasets), replacement=True, generator=generator)
        plan = []
        for d in draws.tolist():
            if not queues[d]:
                queues[d] = collections.deque(self._batches_of(datasets[d], generator))
            plan.append((d, queues[d].popleft()))
        return plan
