"""One optimizer step over ``optim.grad_accum`` micro-batches without waiting on the device.

A step whose loss is not finite on any process is skipped on the device: a ``torch.amp.GradScaler`` (Accelerate's
for fp16, our own fixed-scale one otherwise) tells the fused optimizers to skip their update when the gradients
hold inf/nan, which a non-finite loss on any rank puts into every rank's gradients through the all-reduce; the
BatchNorm statistics of such a step are put back from a copy taken at the step's start (``torch.where``, also on
the device). Counts of skipped steps stay on the device until the log interval reads them.

Under DeepSpeed the engine steps inside ``backward``: there a non-finite loss is checked on the host before the
backward of each micro-batch, and that micro-batch is left out.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist
from accelerate import Accelerator

from trainers.setup import Parts

log = logging.getLogger("trainers.retrieval")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class StepGuard:
    """Backward, gradient averaging of the criterion's parameters, clipping and the (maybe skipped) step."""

    def __init__(self, parts: Parts, accelerator: Accelerator, clip_grad: float) -> None:
        self.parts, self.accelerator, self.clip_grad = parts, accelerator, clip_grad
        self.deepspeed = accelerator.state.deepspeed_plugin is not None
        self.own_scaler = accelerator.scaler is None and not self.deepspeed
        device = accelerator.device
        if self.own_scaler:  # scale 1 (exact); only its inf/nan check and device-side skip are wanted
            self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
        else:
            self.scaler = accelerator.scaler
        # the running statistics (and batch counts) of BatchNorm / InstanceNorm: the buffers a forward changes
        norms = [m for m in parts.raw_model.modules() if getattr(m, "track_running_stats", False)]
        self.buffers = [b for m in norms for b in m.buffers(recurse=False) if b is not None]
        self.saved: list[torch.Tensor] = []
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps in a row
        self.worst = torch.zeros((), dtype=torch.int64, device=device)  # longest such run since the last read
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps since the last read

    def begin(self) -> None:
        """At the first micro-batch of a step: remember the BatchNorm statistics."""
        self.saved = [b.clone() for b in self.buffers]
        self.bad.zero_()

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self.bad |= ~finite
        if self.deepspeed and not bool(finite):  # the engine cannot skip a step on the device
            return
        self.accelerator.backward(self.scaler.scale(loss) if self.own_scaler else loss)

    def step(self) -> None:
        """At the last micro-batch of a step (every process calls it)."""
        parts, accelerator = self.parts, self.accelerator
        if accelerator.num_processes > 1:
            self.bad = accelerator.reduce(self.bad.to(torch.int32), "max").bool()  # any rank's non-finite loss
        self._average_criterion_grads()
        optimizers = [inner(o) for o in (parts.optimizer, parts.aux_optimizer, parts.extra_optimizer) if o is not None]
        if self.deepspeed:  # the engine stepped in backward; the criterion's optimizers step here
            if not bool(self.bad):
                for opt in optimizers[1:]:
                    opt.step()
        else:
            if self.clip_grad > 0:
                self.scaler.unscale_(optimizers[0])
                torch.nn.utils.clip_grad_norm_(parts.model.parameters(), self.clip_grad)
            for opt in optimizers:
                self.scaler.step(opt)
            self.scaler.update(1.0 if self.own_scaler else None)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, saved in zip(self.buffers, self.saved):
                buf.copy_(torch.where(self.bad, saved, buf))
        self.run = (self.run + 1) * self.bad
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped += self.bad

    def _average_criterion_grads(self) -> None:
        """The criterion's parameters live outside DDP: average their gradients over the processes."""
        if self.accelerator.num_processes == 1:
            return
        for param in self.parts.criterion.parameters():
            if param.grad is not None:
                param.grad.copy_(self.accelerator.reduce(param.grad, "mean"))

    def read_skips(self) -> tuple[int, int]:
        """(steps skipped, longest run of them) since the last read; a host sync, at log intervals only."""
        skipped, worst = int(self.skipped), int(self.worst)
        self.skipped.zero_()
        self.worst.copy_(self.run)
        return skipped, worst


class StopSignal:
    """SIGUSR2/SIGTERM, agreed on by every process without a device sync.

    Each step every process posts its flag to an asynchronous all-reduce on a CPU (gloo) group and reads the
    result of the previous step's: all processes learn of a signal at the same step, one step after it came.
    """

    def __init__(self, world_size: int) -> None:
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.pending: tuple | None = None

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def poll(self) -> int:
        """The signal number every process agrees on at this step (0 = none); called once per step by all."""
        if self.group is None:
            return self.signum
        agreed = self._collect()
        flag = torch.tensor([self.signum], dtype=torch.int64)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def _collect(self) -> int:
        if self.pending is None:
            return 0
        work, flag = self.pending
        work.wait()
        self.pending = None
        return int(flag.item())

    def close(self) -> None:
        self._collect()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
