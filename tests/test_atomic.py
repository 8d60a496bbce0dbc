"""utils/: atomic writes (temp files never linger, a full disk says so), stores bound to one address."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from mmdit.utils.atomic import DiskFullError, atomic_path, atomic_torch_save, atomic_write_text, remove_stale_tmp


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_a_full_disk_is_named_and_its_temp_file_removed(tmp_path, monkeypatch):
    target = tmp_path / "optimizer.pt"

    def no_space(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError, match=f"no space left on device writing {target}"):
        atomic_torch_save({"a": 1}, target)
    assert os.listdir(tmp_path) == []  # the space of the partial file came back

    def torch_short_write(obj, f, *a, **k):  # what torch.save reports on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", torch_short_write)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(DiskFullError):
        atomic_torch_save({"a": 1}, target)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from mmdit.utils.atomic import host_id

    mine_dead = tmp_path / f".tmp-{host_id()}-{pid}-abcd1234-model.safetensors"
    other_host = tmp_path / ".tmp-elsewhere-1-abcd1234-x"
    live = tmp_path / f".tmp-{host_id()}-{os.getppid()}-abcd1234-y"
    for p in (mine_dead, other_host, live):
        p.write_bytes(b"partial")
    assert remove_stale_tmp(tmp_path, ".tmp-*") == 1
    assert not mine_dead.exists() and other_host.exists() and live.exists()
    os.utime(other_host, (1, 1))  # old enough
    assert remove_stale_tmp(tmp_path, ".tmp-*", max_age_s=60) == 1 and live.exists()


def test_hosted_store_listens_on_its_address_only():
    from mmdit.utils.processes import free_port
    from mmdit.utils.store import tcp_store

    port = free_port()
    server = tcp_store("127.0.0.1", port, server=True, timeout_s=10)
    client = tcp_store("127.0.0.1", port, server=False, timeout_s=10)
    client.set("k", "v")
    assert server.get("k") == b"v"
    listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == ["0100007F:" + f"{port:04X}"]  # 127.0.0.1, not 0.0.0.0


def test_a_jsonl_log_read_while_written_yields_only_complete_records(tmp_path):
    from mmdit.utils.jsonl import read_jsonl

    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []  # not written yet
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the writer is mid-line
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with open(path, "a") as f:
        f.write('ep": 3}\n')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
