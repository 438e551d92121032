"""The extract writer's flusher thread (``_stream.Writer._flush_soon``): shards fdatasynced while
the run goes on, never beside the fsyncs that make bytes count, and an error it meets refused
ever after (Linux reports a file's write error to one fsync only).

Values are checked against the hook-and-mask reference of ``test_extract_tokens`` and against
the bytes of a run without the flusher.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from typing import Any

import pytest
import torch
from conftest import tiny_gpt2
from test_extract_tokens import GPT2_KEYS, padded_batches, rows_by_hand

import tensorsnap
from tensorsnap import BundleError, _stream


def extract(out: Any, batches: list[Any], **options: Any) -> tensorsnap.Snapshot:
    return tensorsnap.extract(
        tiny_gpt2(), batches, out=out, include=GPT2_KEYS, per_token=True, progress=False, **options
    )


def shard_bytes(path: Any) -> dict[str, bytes]:
    return {
        name: (path / name).read_bytes()
        for name in sorted(os.listdir(path))
        if name.endswith(".safetensors")
    }


def six_batches() -> list[dict[str, torch.Tensor]]:
    return padded_batches() + padded_batches(right=False, seed=9)


def name_of(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")


@linux_only
@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
def test_shards_are_flushed_while_the_run_goes_on_and_bytes_are_unchanged(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    monkeypatch.setattr(_stream, "BACKGROUND", background)
    monkeypatch.setattr(_stream, "_FLUSH_BYTES", 600)
    flushed: list[tuple[str, threading.Thread]] = []
    real = _stream._FDATASYNC

    def record(fd: int) -> None:
        flushed.append((name_of(fd), threading.current_thread()))
        real(fd)

    monkeypatch.setattr(_stream, "_FDATASYNC", record)
    batches = six_batches()
    got = extract(tmp_path / "flushed", batches)
    for key, value in rows_by_hand(tiny_gpt2(), batches, GPT2_KEYS).items():
        assert torch.equal(got[key], value), key
    # several flushes, each of shard files, none made by the thread that writes
    assert len(flushed) >= len(batches)
    assert all(_stream._SHARD_FILE.fullmatch(name) for name, _ in flushed)
    assert {name for name, _ in flushed} == set(shard_bytes(tmp_path / "flushed"))
    assert {thread.name.split("_")[0] for _, thread in flushed} == {"tensorsnap-flush"}
    monkeypatch.setattr(_stream, "FLUSH", False)
    flushed.clear()
    extract(tmp_path / "plain", batches)
    assert flushed == []
    assert shard_bytes(tmp_path / "flushed") == shard_bytes(tmp_path / "plain")


@linux_only
@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
@pytest.mark.parametrize("commit", [0.0, 1e9], ids=["journal-every-batch", "journal-once"])
def test_no_flush_runs_beside_an_fsync_or_a_close(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool, commit: float
) -> None:
    monkeypatch.setattr(_stream, "BACKGROUND", background)
    monkeypatch.setattr(_stream, "_FLUSH_BYTES", 600)
    monkeypatch.setattr(_stream, "_COMMIT_SECONDS", commit)
    monkeypatch.setattr(_stream, "_MAX_OPEN", 2)  # files closed and reopened every batch
    busy = threading.Event()
    seen: list[str] = []
    real_flush, real_fsync, real_close = _stream._FDATASYNC, os.fsync, os.close

    def slow_flush(fd: int) -> None:
        busy.set()
        try:
            before = name_of(fd)
            assert _stream._SHARD_FILE.fullmatch(before), before  # an open shard, not a stale fd
            time.sleep(0.01)  # a slow disk: the writer goes on meanwhile
            assert name_of(fd) == before, "the file was closed during its flush"
            real_flush(fd)
            seen.append(before)
        finally:
            busy.clear()

    def fsync(fd: int) -> None:
        assert not busy.is_set(), f"fsync of {name_of(fd)} beside a flush"
        real_fsync(fd)

    def close(fd: int) -> None:
        if busy.is_set():  # a shard closed now would leave the flush with a stale descriptor
            shard = _stream._SHARD_FILE.fullmatch(name_of(fd))
            assert not shard, f"{name_of(fd)} closed beside a flush"
        real_close(fd)

    monkeypatch.setattr(_stream, "_FDATASYNC", slow_flush)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    batches = six_batches()
    got = extract(tmp_path / "acts", batches)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "close", real_close)
    assert seen, "nothing was flushed"
    for key, value in rows_by_hand(tiny_gpt2(), batches, GPT2_KEYS).items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
def test_a_failed_flush_is_raised_and_no_journal_entry_vouches_for_later_batches(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    monkeypatch.setattr(_stream, "BACKGROUND", background)
    monkeypatch.setattr(_stream, "_FLUSH_BYTES", 600)
    monkeypatch.setattr(_stream, "_COMMIT_SECONDS", 1e9)  # journal after batch 1 and on errors
    calls = [0]
    real = _stream._flush

    def failing(fds: list[int]) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the flush after batch 2: batch 1 is journaled by then
            raise OSError(errno.EIO, "Input/output error")
        real(fds)

    monkeypatch.setattr(_stream, "_flush", failing)
    batches = six_batches()
    out = tmp_path / "acts"
    with pytest.raises(BundleError, match=r"writing failed \(\[Errno 5\] Input/output error\)"):
        extract(out, batches)
    # the error comes back to no later fsync of those files, so the journal entry made on the
    # way out (it would name every batch written) is refused: the last entry stands
    state = json.loads((out / "extract-journal.json").read_text())
    assert state["batches"] == 1
    monkeypatch.setattr(_stream, "_flush", real)
    got = extract(out, batches, resume=True)
    for key, value in rows_by_hand(tiny_gpt2(), batches, GPT2_KEYS).items():
        assert torch.equal(got[key], value), key
    extract(tmp_path / "reference", batches)
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")


def test_kill_9_inside_a_flush_then_resume_is_bitwise_equal(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = six_batches()
    extract(tmp_path / "reference", batches)
    out = tmp_path / "acts"
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            signal.alarm(60)
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            _stream._FLUSH_BYTES = 600
            _stream._COMMIT_SECONDS = 0.0
            calls = [0]
            real = _stream._FDATASYNC

            def killing(fd: int) -> None:
                calls[0] += 1
                real(fd)
                if calls[0] == 9:  # part way through a flush, batches 3-4 written
                    os.kill(os.getpid(), signal.SIGKILL)

            _stream._FDATASYNC = killing
            extract(out, batches)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    with pytest.raises(tensorsnap.TensorSnapError, match=r"unfinished tensorsnap\.extract"):
        tensorsnap.load(out)
    assert 0 < json.loads((out / "extract-journal.json").read_text())["batches"] < len(batches)
    got = extract(out, batches, resume=True)
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    for key, value in rows_by_hand(tiny_gpt2(), batches, GPT2_KEYS).items():
        assert torch.equal(got[key], value), key


@linux_only
@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
def test_every_shard_is_fsynced_after_its_last_write_before_the_manifest(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    monkeypatch.setattr(_stream, "BACKGROUND", background)
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def logged(name: str, real: Any, by_fd: bool = True) -> Any:
        def call(*args: Any) -> Any:
            what = name_of(args[0]) if by_fd else os.path.basename(str(args[1]))
            result = real(*args)
            with lock:
                events.append((name, what))
            return result

        return call

    for name in ("write", "pwrite", "ftruncate", "fsync"):
        monkeypatch.setattr(os, name, logged(name, getattr(os, name)))
    monkeypatch.setattr(os, "replace", logged("replace", os.replace, by_fd=False))
    batches = six_batches()
    extract(tmp_path / "acts", batches)
    monkeypatch.undo()
    commit = events.index(("replace", "manifest.json"))
    shards = set(shard_bytes(tmp_path / "acts"))
    assert len(shards) == len(GPT2_KEYS) + 1
    for shard in shards:
        changes = [i for i, (op, f) in enumerate(events) if f == shard and op != "fsync"]
        synced = [i for i, (op, f) in enumerate(events) if (op, f) == ("fsync", shard)]
        # its header and padding are its last changes, made durable before the commit point
        assert max(changes) < max(synced) < commit, shard
        assert ("pwrite", shard) in events[: max(synced)]
    assert not [e for e in events[commit:] if e[1] in shards]  # nothing touches them after
