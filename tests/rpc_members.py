"""Members of a data-service RPC group for tests/test_rpc_group.py, one role per process.

`python rpc_members.py ROLE PORT DIR`: `host` creates the group (rank 0, the store), stays until
DIR/stop exists and writes the member list to DIR/members.txt; `member` joins and stays; `leaver` joins, waits for DIR/go, starts a call to
`member` that cannot finish (the test has SIGSTOPped it), leaves gracefully and records how.
"""

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.rpc as torch_rpc

from mmdit.dataservice import rpc


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def main(role: str, port: int, out: Path) -> None:
    name = {"host": rpc.COORDINATOR, "member": "member_1", "leaver": "leaver_1"}[role]
    rpc.join(name, "127.0.0.1", port, rank=0 if role == "host" else None, rpc_timeout_s=600, join_timeout_s=120)
    (out / f"{role}.joined").touch()
    if role != "leaver":
        wait_for(out / "stop")
        if role == "host":  # the group's member list, as the next joiner would read it
            store = torch_rpc.api._get_current_rpc_agent().store
            (out / "members.txt").write_bytes(dist.PrefixStore("names", store).get("_ALL_WORKER_INFOS"))
        rpc.leave(graceful=False)
        return
    wait_for(out / "go")
    abandoned = torch_rpc.rpc_async("member_1", time.sleep, args=(0.0,), timeout=600)
    started = time.monotonic()
    graceful = rpc.leave(graceful=True, timeout_s=60)
    result = {"graceful": graceful, "leave_s": time.monotonic() - started}
    try:
        abandoned.wait()
        result["call"] = "answered"
    except RuntimeError as e:  # the local shutdown fails what is still out
        result["call"] = f"abandoned: {e}"
    (out / "leaver.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
