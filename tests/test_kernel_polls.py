"""lecturelib.kernel_polls: a lost wake-up costs one slice, timeouts keep their meaning."""

import asyncio
import time
from queue import Empty

import nbformat
import pytest
from nbclient.client import NotebookClient

from lecturelib.kernel_polls import slice_channels, sliced_get_msg, sliced_kernel_polls


class LostWakeupChannel:
    """A channel whose poll only sees messages that were there when the poll began.

    Like the ZeroMQ poll that misses its edge-triggered wake-up: a message arriving during
    a poll is noticed only when that poll's timeout runs out (its last zero-time check).
    """

    def __init__(self, arrives_after: float | None):
        self.start = time.monotonic()
        self.arrives_after = arrives_after
        self.timeouts: list[float | None] = []

    def _there(self) -> bool:
        return self.arrives_after is not None and time.monotonic() - self.start >= self.arrives_after

    async def get_msg(self, timeout=None):
        self.timeouts.append(timeout)
        if self._there():
            return {"msg": "reply"}
        if timeout is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(timeout)
        if self._there():
            return {"msg": "reply"}
        raise Empty


def _timed(coro):
    t0 = time.monotonic()
    out = asyncio.run(coro)
    return out, time.monotonic() - t0


def test_unsliced_poll_waits_for_its_whole_timeout():
    """The failure being worked around, reproduced by the fake channel."""
    ch = LostWakeupChannel(arrives_after=0.05)
    msg, seconds = _timed(ch.get_msg(timeout=1.5))
    assert msg == {"msg": "reply"} and seconds >= 1.4


@pytest.mark.parametrize("timeout", [1.5, None])
def test_sliced_poll_picks_up_a_lost_message_within_one_slice(timeout):
    ch = LostWakeupChannel(arrives_after=0.05)
    msg, seconds = _timed(sliced_get_msg(ch.get_msg, slice_s=0.1)(timeout=timeout))
    assert msg == {"msg": "reply"}
    assert seconds < 0.5
    assert all(t is not None and t <= 0.1 for t in ch.timeouts)


def test_sliced_poll_still_times_out_on_time():
    ch = LostWakeupChannel(arrives_after=None)
    with pytest.raises(Empty):
        _timed(sliced_get_msg(ch.get_msg, slice_s=0.1)(timeout=0.35))
    assert 3 <= len(ch.timeouts) <= 5 and sum(ch.timeouts) == pytest.approx(0.35, abs=0.05)


def test_zero_timeout_polls_once():
    ch = LostWakeupChannel(arrives_after=None)
    with pytest.raises(Empty):
        asyncio.run(sliced_get_msg(ch.get_msg, slice_s=0.1)(timeout=0))
    assert ch.timeouts == [0.0]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_slice_is_rejected(bad):
    with pytest.raises(ValueError, match="slice_s"):
        sliced_get_msg(LostWakeupChannel(None).get_msg, slice_s=bad)


def test_channels_are_wrapped_once():
    class KC:
        shell_channel = LostWakeupChannel(0.0)
        iopub_channel = LostWakeupChannel(0.0)

    kc = slice_channels(KC())
    first = kc.shell_channel.get_msg
    slice_channels(kc)
    assert kc.shell_channel.get_msg is first and hasattr(kc.iopub_channel.get_msg, "__wrapped__")


def test_real_kernel_runs_with_sliced_polls_and_methods_are_restored():
    original = (NotebookClient.async_start_new_kernel_client, NotebookClient.start_new_kernel_client)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    with sliced_kernel_polls():
        client = NotebookClient(nb, kernel_name="python3", timeout=60)
        client.execute()
    assert nb.cells[0].outputs[0]["text"].strip() == "42"
    assert (NotebookClient.async_start_new_kernel_client, NotebookClient.start_new_kernel_client) == original
