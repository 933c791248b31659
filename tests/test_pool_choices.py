"""The process pool's choices that need no child process: how many tasks a seat holds, which
seat takes the next, and when a child holds a reply back (its serve loop, on a socket pair)."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hedwig_tasks import Hedwig
from hedwig_tasks.pool import child, processes
from hedwig_tasks.pool.framing import FrameReader, frame_of, task_header
from hedwig_tasks.testing import worker_contract
from hedwig_tasks.testing.worker_contract import build_app
from hedwig_tasks.validators.base import to_transport


def _task(app: Hedwig, user_id: str, limit_s: float | None = None) -> bytes:
    encoded = app.validator.encode(app.message("user-created", "1.0", {"user_id": user_id}))
    body, attributes = to_transport(encoded, text_only=False)
    return frame_of(task_header("users", 1, user_id, limit_s, attributes), body)


def test_a_child_holds_quick_replies_for_tasks_read_already_but_never_while_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "HEDWIG_TRANSPORT_URL": "memory://",
        worker_contract.APP_NAME_ENV: "pooled",
        worker_contract.TOPIC_ENV: "users",
        worker_contract.RESULTS_ENV: str(tmp_path / "results.jsonl"),
        worker_contract.SLOW_ENV: "0.05",  # "slow..." users sleep 50 ms
    }.items():
        monkeypatch.setenv(name, value)
    app = build_app()
    tasks_r, tasks_w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a packet per write
    ours.settimeout(30)

    def writes(count: int) -> list[list[str]]:
        """The actions the replies in each of the child's next ``count`` writes carry."""
        packets = []
        for _ in range(count):
            read_fd, write_fd = os.pipe()
            os.write(write_fd, ours.recv(1 << 16))
            os.close(write_fd)
            frames = FrameReader(read_fd).read_some() or []
            os.close(read_fd)
            packets.append([header["action"] for header, _ in frames])
        return packets

    monkeypatch.setattr(child, "HOLD_S", 60.0)  # however slow the machine, these runs are quick
    os.write(tasks_w, _task(app, "U1") + _task(app, "U2") + _task(app, "U3"))
    serving = threading.Thread(target=child.serve, args=(app, tasks_r, theirs.fileno()))
    serving.start()
    assert writes(1) == [["ack", "ack", "ack"]]  # read in one go: answered in one write, before more came

    os.write(tasks_w, _task(app, "U4") + _task(app, "U5", limit_s=30.0) + _task(app, "U6"))
    assert writes(3) == [["ack"], ["ack"], ["ack"]]  # a time limit: the reply before it and its own go alone

    monkeypatch.setattr(child, "HOLD_S", 0.002)
    os.write(tasks_w, _task(app, "slow1") + _task(app, "U7"))
    assert writes(2) == [["ack"], ["ack"]]  # a slow run's reply does not wait for the next

    os.close(tasks_w)
    serving.join(30)
    assert not serving.is_alive()
    os.close(tasks_r)
    ours.close()
    theirs.close()
    app.close()


def test_quick_children_hold_what_runs_in_two_ms_and_are_filled_busiest_first() -> None:
    assert processes.lanes_for(0.005) == processes.LANES  # long runs: one running, one waiting
    assert processes.lanes_for(0.0002) == 8
    assert processes.lanes_for(0.0) == processes.MOST_LANES
    idle, running, full = processes._Seat(), processes._Seat(), processes._Seat()
    for seat, count in ((idle, 0), (running, 3), (full, 8)):
        seat.lanes, seat.count = 8, count
    now = time.monotonic()
    order = functools.partial(processes._order, now=now)
    assert sorted([idle, full, running], key=order) == [running, idle, full]
    running.child = SimpleNamespace(waiting=[SimpleNamespace(started_at=now - 1.0)])  # type: ignore[assignment]
    assert order(running) == order(full)  # its run stalls: nothing more joins what waits behind it
    running.child = None
    for seat in (idle, running):  # long runs: the emptiest first, so no run waits while a child idles
        seat.lanes = processes.LANES
    running.count = 1
    assert min([running, idle], key=order) is idle
