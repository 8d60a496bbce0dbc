"""Asynchronous checkpoints: the step loop waits only while state is copied to host memory.

A save runs the three steps of consumer/checkpoint.py, as torchtitan's async checkpointing does:

    stage     main thread, at the step boundary: the finiteness check (a collective) and host
              copies of this rank's model slices and optimizer state (parallel/staging.py)
    write     a background thread per rank: the files, atomically, with their checksums; no
              collective (one from a second thread would interleave with training's own)
    publish   main thread, at the first step boundary where every rank's write has finished
              (one gloo all-reduce per step while a write is pending tells): trainer.json, then
              `latest`, then retention

At most one save is in flight: a new one, a stop or the end of training waits for the previous
write and publishes it first. So a crash mid-write leaves an incomplete directory (no
trainer.json) that resume passes over and retention removes: only that checkpoint is lost.
`checkpoint.async_save=false` runs the three steps in a row (the files are the same).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from mmdit.consumer.checkpoint import (
    StagedCheckpoint,
    WriteReport,
    prune_checkpoints,
    publish_checkpoint,
    stage_checkpoint,
    write_staged,
)
from mmdit.parallel.staging import HostStaging

log = logging.getLogger("mmdit.checkpoint")


class _Write:
    """One rank's write of a staged checkpoint in a daemon thread."""

    def __init__(self, staged: StagedCheckpoint):
        self.staged, self.report = staged, None
        self.thread = threading.Thread(target=self._run, name=f"mmdit-save-{staged.step}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = write_staged(self.staged)
        except Exception as e:  # noqa: BLE001 - reported to every rank at publish, as an OSError is
            self.report = WriteReport({}, e)

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> WriteReport:
        self.thread.join()
        return self.report


class Checkpointer:
    """Saves, publishes and prunes a run's checkpoints, synchronously or with the write in the
    background. Every method that may publish is collective: all ranks call it at the same step
    boundaries (they save at the same steps, and the publish decision is agreed on)."""

    def __init__(self, run_dir: Path, keep: int, keep_every: int, asynchronous: bool, rank0: bool):
        self.run_dir, self.keep, self.keep_every, self.rank0 = Path(run_dir), keep, keep_every, rank0
        self.staging = HostStaging() if asynchronous else None
        self.pending: _Write | None = None
        self.published: list[int] = []
        """Steps published by this process, in order."""

    @property
    def asynchronous(self) -> bool:
        return self.staging is not None

    def save(self, step: int, model, backend, dims, data_state: dict, trainer_state: dict, ema=None,
             objective: dict | None = None) -> float:
        """Save the checkpoint of `step` (with the EMA weights `ema`, when kept); returns the seconds
        the caller waited (the stall). An asynchronous save returns once the state is in host
        memory, after publishing the previous."""
        started = time.perf_counter()
        self.finish(model)  # at most one in flight; its host buffers are reused
        staged = stage_checkpoint(self.run_dir, step, model, backend, dims, data_state, trainer_state, self.staging,
                                  ema=ema, objective=objective)
        if self.staging is None:
            self._publish(staged, write_staged(staged), model)
        else:
            self.pending = _Write(staged)
        return time.perf_counter() - started

    def poll(self, model) -> float:
        """At a step boundary: publish the pending checkpoint if every rank has written its part.
        Collective while one is pending; returns the seconds it took."""
        if self.pending is None:
            return 0.0
        from mmdit.parallel.state import all_ranks_true

        started = time.perf_counter()
        if all_ranks_true(self.pending.done()):
            self.finish(model)
        return time.perf_counter() - started

    def finish(self, model) -> float:
        """Wait for the pending write (if any) and publish it: before a new save, on a stop and at
        the end of training. Collective while one is pending."""
        if self.pending is None:
            return 0.0
        started = time.perf_counter()
        pending, self.pending = self.pending, None
        self._publish(pending.staged, pending.wait(), model)
        return time.perf_counter() - started

    def abandon(self) -> None:
        """On an error or a second Ctrl-C: publish nothing and wait for nothing (no collective: the
        other ranks may be gone); the writer, a daemon thread, ends with the process. Its directory
        stays incomplete, as after a crash: resume passes it over, retention removes it."""
        self.pending = None

    def _publish(self, staged: StagedCheckpoint, report: WriteReport, model) -> None:
        publish_checkpoint(staged, report, model)
        self.published.append(staged.step)
        if self.rank0:
            prune_checkpoints(self.run_dir, self.keep, self.keep_every)
