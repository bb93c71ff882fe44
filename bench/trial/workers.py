"""One rank of a trial's DDP worker group: `Workers` is the group seam of `bench.trial.train.run` (whose
`OneProcess` is the identity) for a process that torch.distributed has joined to others.

- data: the training loader rebuilt around a `DistributedSampler` (each rank 1/N of every epoch, reshuffled
  with `set_epoch`), batch_size / N per rank, so one step of N ranks sees the global batch; the held-out,
  calibration and test loaders are the full ones, and every evaluation runs on rank 0 over them (its numbers
  are the single-process numbers) and is broadcast;
- model: `DistributedDataParallel` (still the multi-exit contract: `ExitDDP`), handed to the strategy by
  `Strategy.distribute` with this group, whose collectives (`average`, `broadcast`, `gather`) a strategy's own
  networks and statistics go through (methods/base.py: `average_gradients`, `worker_mean`; L2W keeps its pseudo
  step per rank and averages its WPN's meta-gradient; Meta-GF trains copies and keeps the model outside DDP);
- metrics: the epoch's sums (losses x samples, correct counts, samples) all-reduced, never rank 0's alone;
- checkpoints: written by rank 0, read by every rank on resume; each rank's random streams are re-seeded from
  (seed, epoch, rank) at every epoch, so a resumed epoch draws what the uninterrupted one drew.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from bench.config import TrialConfig
from bench.trial.files import save_checkpoint


class ExitDDP(DistributedDataParallel):
    """DDP that still offers the multi-exit contract: what the wrapper lacks (num_exits, head_module, ...)
    comes from the wrapped network."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class _Sharded:
    """A data bundle whose training loader is this rank's share; everything else is the bundle's own."""

    def __init__(self, bundle, train: DataLoader):
        self._bundle, self.train = bundle, train

    def __getattr__(self, name: str):
        return getattr(self._bundle, name)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{epoch}-{rank}".encode()).digest()[:8], "little") % 2**63


class Workers:
    """This process's rank of the trial's DDP group (torch.distributed initialised), as bench.trial.train.run uses it
    (see bench.trial.train.OneProcess for the hooks)."""

    def __init__(self, cfg: TrialConfig, device: torch.device):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.seed, self.sync_bn, self.regime = cfg.seed, cfg.workers.sync_bn, cfg.regime.name
        self.batch_size = cfg.batch_size // self.size
        self.device = torch.device(device)
        # nccl moves only CUDA tensors; gloo CPU ones
        self.comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.sampler: DistributedSampler | None = None
        self.generator = torch.Generator()

    def shard(self, bundle):
        full = bundle.train
        self.sampler = DistributedSampler(full.dataset, num_replicas=self.size, rank=self.rank, shuffle=True,
                                          seed=self.seed)
        train = DataLoader(full.dataset, batch_size=self.batch_size, sampler=self.sampler,
                           drop_last=len(self.sampler) > self.batch_size, generator=self.generator,
                           num_workers=full.num_workers, pin_memory=full.pin_memory,
                           persistent_workers=full.persistent_workers, worker_init_fn=full.worker_init_fn,
                           collate_fn=full.collate_fn)
        return _Sharded(bundle, train)

    def wrap(self, strategy, model: torch.nn.Module) -> None:
        if self.sync_bn:  # in place: the optimiser's parameters and the buffers are the same tensors
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        # Parameters without a gradient in some step (a regime's frozen parts and phase 1's unused heads, exits
        # of weight 0): DDP must be told to look for them, which costs a graph walk per step otherwise saved.
        unused = self.regime != "joint" or strategy.leaves_parameters_unused()
        strategy.distribute(ExitDDP(model, device_ids=ids, find_unused_parameters=unused), self)

    def begin_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        seed = epoch_seed(self.seed, epoch, self.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)

    def sum(self, *values):
        flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]).to(self.comm)
        dist.all_reduce(flat)
        flat, out, start = flat.cpu(), [], 0
        for v in values:
            if isinstance(v, torch.Tensor):
                out.append(flat[start:start + v.numel()].to(v.dtype).reshape(v.shape))
                start += v.numel()
            else:
                out.append(type(v)(flat[start].item()))
                start += 1
        return tuple(out)

    def first(self, fn, *args, **kwargs):
        box = [fn(*args, **kwargs) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def save(self, path: Path, state: dict[str, Any]) -> None:
        if self.rank == 0:
            save_checkpoint(path, state)

    # collectives for strategies with networks of their own (Strategy.distribute)
    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ranks' mean of each tensor (one all-reduce)."""
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self.comm)
        dist.all_reduce(flat)
        flat = flat.to(tensors[0].device) / self.size
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return out

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        for t in module.state_dict().values():
            buffer = t.detach().to(self.comm)
            dist.broadcast(buffer, src=0)
            t.detach().copy_(buffer)
