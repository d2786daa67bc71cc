"""Bounded kernel polls for headless runs: a lost wake-up must cost a second, not a timeout.

papermill and nbgrader both run notebooks through nbclient, which waits for the kernel's
replies with ``await channel.get_msg(timeout=T)``: one asyncio poll on a ZeroMQ socket.
Now and then the wake-up for a message that has already arrived is lost (ZeroMQ signals
readiness edge-triggered). The poll then sleeps until T runs out, finds the message in a
last zero-time poll, and the cell "succeeds" T seconds late: with ``--timeout 600`` a
notebook that needs 10 s took 610 s in CI; with no timeout it would never end.
Reproduced here with papermill on a 3-cell widget notebook: 2 of 137 runs took the full
120 s timeout (nbclient issue #312 reports the same symptom).

The work-around: split every wait into polls of at most ``slice_s`` seconds. Each new
poll first checks the socket's state, so a message whose wake-up was lost is picked up
within ``slice_s``; timeouts keep their meaning (Empty is raised once T has passed).

    with sliced_kernel_polls():
        papermill.execute_notebook(...)

Used in: lecturelib.workbook (make workbook, make test), lecturelib.release (validate).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

POLL_SLICE_S = 1.0
"""Longest single poll; the most a lost wake-up can delay a reply."""

GetMsg = Callable[..., Awaitable[dict[str, Any]]]


def sliced_get_msg(get_msg: GetMsg, slice_s: float = POLL_SLICE_S) -> GetMsg:
    """Wrap an async ``get_msg(timeout=None)`` so that no single poll lasts over ``slice_s``."""
    if not slice_s > 0:
        raise ValueError(f"slice_s must be > 0 seconds, got {slice_s!r}")

    async def get_msg_sliced(timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = slice_s if left is None else min(slice_s, left)
            try:
                return await get_msg(timeout=step)
            except Empty:
                if left is not None and left <= slice_s:
                    raise

    get_msg_sliced.__wrapped__ = get_msg  # type: ignore[attr-defined]
    return get_msg_sliced


def slice_channels(kc: Any, slice_s: float = POLL_SLICE_S) -> Any:
    """Make the shell and iopub channels of an async kernel client poll in slices."""
    for channel in (kc.shell_channel, kc.iopub_channel):
        if not hasattr(channel.get_msg, "__wrapped__"):
            channel.get_msg = sliced_get_msg(channel.get_msg, slice_s)
    return kc


@contextmanager
def sliced_kernel_polls(slice_s: float = POLL_SLICE_S) -> Iterator[None]:
    """Every nbclient NotebookClient started inside the block polls its kernel in slices.

    Patches ``NotebookClient.(async_)start_new_kernel_client``, which papermill's
    PapermillNotebookClient and nbgrader's Execute preprocessor inherit, and restores them.
    """
    from nbclient.client import NotebookClient
    from nbclient.util import run_sync

    original_async = NotebookClient.async_start_new_kernel_client
    original_sync = NotebookClient.start_new_kernel_client

    async def start_new_kernel_client(self: NotebookClient) -> Any:
        return slice_channels(await original_async(self), slice_s)

    NotebookClient.async_start_new_kernel_client = start_new_kernel_client  # type: ignore[method-assign]
    NotebookClient.start_new_kernel_client = run_sync(start_new_kernel_client)  # type: ignore[method-assign]
    try:
        yield
    finally:
        NotebookClient.async_start_new_kernel_client = original_async  # type: ignore[method-assign]
        NotebookClient.start_new_kernel_client = original_sync  # type: ignore[method-assign]
