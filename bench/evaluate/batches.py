"""A model run over a loader without gradients (evaluation): every batch's forward pass, in the loader's order,
with progress on stderr when asked.

On a CPU with several torch threads the batches are spread over that many worker threads, each running torch
single-threaded, instead of one batch at a time on a team of threads. The outputs are the same bits: an
eval-mode forward pass splits its work over threads by sample, channel or pixel, never inside a sum
(tests/test_first_run.py checks it on an MSDNet; tiny, msdnet, ranet and sdn presets gave identical logits at 1
and 2 threads on the development CPU), so a batch's logits do not depend on the thread count. The time no longer
depends on the machine's load: a team of threads meets at a barrier after every op (hundreds per MSDNet batch),
and on a busy machine each barrier waits for a descheduled thread, which made evaluation 15-30x slower than
this (benchmarks/eval_speed.py; 1.7x idle). On a GPU the batches run one after another as before.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def single_threaded():
    """torch's intra-op threads set to 1 inside, restored after (torch keeps the count process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


PROGRESS_DELAY_S = 2.0  # a pass shorter than this shows no bar
MAX_WORKERS = 8  # batches at once (twice as many in flight); past 8 threads each worker gets a team of its own


def progress_bar(loader, progress: bool, desc: str):
    """`loader` wrapped in a progress bar on stderr when `progress` and stderr is a terminal (a log or a pipe gets
    no carriage-return lines; a pass shorter than PROGRESS_DELAY_S shows none), else `loader` itself."""
    if not progress or not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, unit="batch", leave=False, delay=PROGRESS_DELAY_S, file=sys.stderr,
                dynamic_ncols=True)


def map_batches(fn: Callable[[torch.Tensor, Any], Any], loader, device, *, progress: bool = False,
                desc: str = "evaluating") -> Iterator[Any]:
    """`fn(x, y)` under no_grad for every batch (x, y, ...) of `loader` (x moved to `device`), yielded in the
    loader's order. `fn` must not change shared state (a model in eval mode is fine): on a CPU it runs in
    `torch.get_num_threads()` worker threads at once, each single-threaded (see the module's docstring); past
    MAX_WORKERS threads, MAX_WORKERS workers share them."""
    device = torch.device(device)
    batches = progress_bar(loader, progress, desc)
    threads = torch.get_num_threads()
    workers = min(threads, MAX_WORKERS) if device.type == "cpu" else 1
    if workers <= 1:
        with torch.no_grad():
            for batch in batches:
                yield fn(batch[0].to(device, non_blocking=True), batch[1])
        return

    def call(x, y):
        with torch.no_grad():  # grad mode is per thread
            return fn(x, y)

    with single_threaded(), ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                               initargs=(threads // workers,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(call, batch[0].to(device), batch[1]))
            if len(pending) >= 2 * workers:  # a bounded number of batches in flight
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@torch.no_grad()
def exit_accuracy(model: torch.nn.Module, loader, device, readout=None, *, progress: bool = False,
                  desc: str = "val accuracy") -> list[float]:
    """Top-1 accuracy (%) of what every exit reports (through `readout`, when given) on a loader, in eval mode
    (the previous modes are restored): the trial loop's per-epoch val accuracy, the same numbers."""
    from bench.readout import readout_outputs

    modules = [m for m in (model, readout) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()

    def hits(x, y):
        outputs = model(x)
        if readout is not None:
            outputs = readout_outputs(readout, outputs)
        y = y.to(x.device, non_blocking=True)
        return torch.stack([(z.argmax(1) == y).sum() for z in outputs]), y.numel()

    correct, total = None, 0
    try:
        for counts, n in map_batches(hits, loader, device, progress=progress, desc=desc):
            correct = counts if correct is None else correct + counts
            total += n
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return [100.0 * float(c) / max(total, 1) for c in correct]
