"""Ctrl-C and SIGTERM during training: finish the step, save, then stop."""

from __future__ import annotations

import signal
import threading

import torch


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, so that a
    checkpoint can be saved, and says so at once; a second one raises KeyboardInterrupt where the
    program is (a checkpoint being written then stays a hidden temporary: `latest` still names
    the last complete one)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notify=None, message: str = "stopping after this step") -> None:
        self.notify, self.message = notify, message

    def __enter__(self) -> "StopOnSignal":
        self.flag = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if self.notify is not None:
            self.notify(f"{signal.Signals(signum).name}: {self.message}")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> bool:
        """True once any rank got a signal (all ranks must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)
