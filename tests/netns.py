"""Hosts for multi-host tests: Linux network namespaces on a private bridge, on this machine.

`hosts(n)` makes n namespaces, each with a veth on one bridge and an address 10.231.X.k/24 (X
from this process id, so concurrent suites do not share a subnet), and the loopback up. Each
host has a name, `h1`..`hn`, that every host resolves to its address (a per-namespace /etc/hosts,
which `ip netns exec` mounts), while this machine's hostname keeps resolving to 127.0.0.1 as on
many cluster images. Everything is deleted on exit, also when the test fails or is interrupted.
Needs root (CI runs as root) and iproute2 (`ip`, `ss`).

Processes in a namespace share this machine's files (like a shared file system on a cluster) but
nothing of its network: the only route out of a namespace is the bridge. They get a clean
environment: none of the socket and rank variables (TP_SOCKET_IFNAME, MASTER_ADDR, ...) a test
process may have set for itself. `own_pids=True` also gives a command a pid namespace of its own
(its pids mean nothing to other processes), as a process on another machine would have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
_NOT_INHERITED = ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT",
                  "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MMDIT_PARENT_PID",
                  "MMDIT_PROCESS_TABLE", "TORCHELASTIC_USE_AGENT_STORE")


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ss", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    probe = f"mmdit_probe_{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    return {**env, "OMP_NUM_THREADS": "1", **(extra or {})}


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str
    name: str  # resolves to `ip` on every host
    veth: str  # the namespace's end: its interface name inside the namespace

    def command(self, cmd: list[str], own_pids: bool = False) -> list[str]:
        """`cmd` run inside this host's network namespace (and a pid namespace of its own)."""
        pids = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] if own_pids else []
        return ["ip", "netns", "exec", self.ns, *pids, *cmd]

    def popen(self, cmd: list[str], env: dict | None = None, own_pids: bool = False, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd, own_pids), env=clean_env(env), **kwargs)

    def run(self, cmd: list[str], env: dict | None = None, own_pids: bool = False,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd, own_pids), env=clean_env(env), **kwargs)

    def mmdit(self, *args: str) -> list[str]:
        """The command line of `mmdit ARGS` (to run with `popen`/`run`)."""
        return [sys.executable, "-m", "mmdit.launch.cli", *args]

    def pids(self, cmdline_has: str = "") -> list[int]:
        """Pids of the processes in this namespace (whose command line contains `cmdline_has`)."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        found = []
        for pid in map(int, out):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline_has in cmdline:
                found.append(pid)
        return found

    def listening(self) -> list[tuple[str, int, str]]:
        """(address, port, process) of every TCP socket listening in this namespace."""
        out = self.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in out.splitlines():
            fields = line.split()
            addr, _, port = fields[3].rpartition(":")
            found.append((addr.strip("[]"), int(port), " ".join(fields[5:])))
        return found


@contextlib.contextmanager
def hosts(n: int, subnet: int | None = None):
    """n namespaces on one private bridge: yields [Host, ...] with addresses 10.231.X.1, .2, ..."""
    tag = f"{os.getpid() % 100000}"
    x = subnet if subnet is not None else 1 + os.getpid() % 250
    bridge = f"mbr{tag}"
    made: list[Host] = []
    planned = [Host(f"mmdit_{tag}_h{k}", f"10.231.{x}.{k}", f"h{k}", "eth0") for k in range(1, n + 1)]
    etc_hosts = Path("/etc/hosts").read_text()
    names = "".join(f"{h.ip} {h.name}\n" for h in planned)
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for k, host in enumerate(planned, 1):
            outer, inner = f"mv{tag}h{k}", f"mi{tag}h{k}"
            _ip("netns", "add", host.ns)
            made.append(host)
            (NETNS_ETC / host.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.ns / "hosts").write_text(etc_hosts.rstrip("\n") + "\n" + names)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", host.ns)
            _ip("link", "set", inner, "name", host.veth, ns=host.ns)
            _ip("addr", "add", f"{host.ip}/24", "dev", host.veth, ns=host.ns)
            _ip("link", "set", host.veth, "up", ns=host.ns)
            _ip("link", "set", "lo", "up", ns=host.ns)
        yield made
    finally:
        for host in made:
            # processes left in a namespace would keep it (and their sockets) alive: kill them first
            pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / host.ns, ignore_errors=True)
        for k in range(1, n + 1):
            subprocess.run(["ip", "link", "del", f"mv{tag}h{k}"], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
