"""The rendezvous under an MPI launcher that left out MASTER_ADDR (or the local ranks), with mpi4py.

Imported only by ``init_distributed`` when ``detect_environment`` marks the process for it
(``rendezvous == "mpi"``): a single-process or torchrun run never imports mpi4py.

1. Local rank, ranks per node and node rank from the communicator
   (``Split_type(COMM_TYPE_SHARED)``), whatever the launcher exported.
2. Rank 0 picks an address the other nodes can reach: the IPv4 address of
   ``distributed.rendezvous_interface`` when set; otherwise the source address of its routes
   towards the other nodes' addresses (which every rank reports), the one that reaches the most
   nodes. Not the first address of ``hostname -I``, as DeepSpeed's ``mpi_discovery`` does: on
   multi-homed nodes that is often an interface the others cannot reach. One node only: loopback.
3. Rank 0 listens on that address and a free port (or MASTER_PORT) and broadcasts both.
4. Every rank connects to it before ``init_process_group``; the outcomes are all-gathered over
   MPI, whose own transport works (it carried the broadcast), and every rank raises the same
   ``RendezvousError`` naming each rank and host that cannot connect, instead of hanging in the
   TCP store until the init timeout.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

from shardtune.distributed.environment import ProcessEnvironment
from shardtune.errors import MissingExtraError, RendezvousError

# A reachable address answers within milliseconds; a route that is missing, or a firewall that
# drops packets, does not get better by waiting. All ranks are up by now (MPI connected them),
# so the init timeout's allowance for slow node start-up does not apply here.
REACH_TIMEOUT_S = 30.0
_SIOCGIFADDR = 0x8915


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MissingExtraError(
            "an MPI launcher started this process without MASTER_ADDR, and the rendezvous needs mpi4py: "
            f"pip install 'shardtune[mpi]' (or export MASTER_ADDR and MASTER_PORT to every rank) ({exc})"
        ) from None
    return MPI


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface that has one (Linux ``SIOCGIFADDR``), loopback included."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address on it
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def route_source(destination: str) -> str | None:
    """The local address the kernel would send from towards ``destination`` (a UDP connect sends
    nothing: it only looks the route up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((destination, 9))
        except OSError:
            return None  # no route at all
        return s.getsockname()[0]


def pick_address(mine: dict[str, str], others: list[list[str]], interface: str | None) -> str:
    """Rank 0's rendezvous address, given its interfaces and each other node's addresses."""
    if interface:
        if interface not in mine:
            raise RendezvousError(
                f"distributed.rendezvous_interface={interface}: rank 0's host {socket.gethostname()} has no "
                f"IPv4 address on it (interfaces with one: {', '.join(sorted(mine)) or 'none'})"
            )
        return mine[interface]
    if not others:
        return "127.0.0.1"  # every rank is on this node
    local = set(mine.values())
    reaches: Counter[str] = Counter()
    for addresses in others:
        # An address this host has too (a docker0 or libvirt bridge on every node) says nothing
        # about the path between the nodes.
        sources = {route_source(a) for a in addresses if a not in local}
        reaches.update(s for s in sources if s and not s.startswith("127."))
    if not reaches:
        raise RendezvousError(
            f"rank 0's host {socket.gethostname()} has no route to any address of the other nodes "
            f"({', '.join(sorted({a for node in others for a in node})) or 'none reported'}); set "
            "distributed.rendezvous_interface or export MASTER_ADDR"
        )
    return reaches.most_common(1)[0][0]


class _Listener:
    """Accepts (and drops) the reachability probes on rank 0 until closed."""

    def __init__(self, address: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
        except OSError as exc:
            self.sock.close()
            raise RendezvousError(f"rank 0 cannot listen on {address}:{port}: {exc}") from None
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shardtune-rendezvous-probe", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def probe(address: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connection to ``address:port`` succeeds before ``timeout_s``, else why not."""
    deadline = time.monotonic() + timeout_s
    error = "timed out"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return None
        except OSError as exc:
            error = str(exc) or type(exc).__name__
            time.sleep(0.2)
    return error


def mpi_rendezvous(env: ProcessEnvironment, interface: str | None = None,
                   timeout_s: float = REACH_TIMEOUT_S) -> ProcessEnvironment:
    """``env`` completed: local/node ranks from the communicator, and a reachable address and port."""
    MPI = _import_mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if (rank, size) != (env.rank, env.world_size):
        raise RendezvousError(f"the launcher's variables say rank {env.rank} of {env.world_size}, "
                              f"MPI_COMM_WORLD says {rank} of {size}")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    leaders = comm.Split(0 if local_rank == 0 else MPI.UNDEFINED, key=rank)
    node_rank = local.bcast(leaders.Get_rank() if local_rank == 0 else None, root=0)
    if leaders != MPI.COMM_NULL:
        leaders.Free()
    local.Free()

    host = socket.gethostname()
    mine = interface_addresses()
    reports = comm.gather((node_rank, host, [a for a in mine.values() if not a.startswith("127.")]), root=0)
    listener, error = None, None
    if rank == 0:
        try:
            others = {node: addrs for node, _, addrs in reports if node != node_rank}
            address = pick_address(mine, list(others.values()), interface)
            listener = _Listener(address, int(os.environ.get("MASTER_PORT") or 0))
            offer = (address, listener.port, host)
        except RendezvousError as exc:
            offer, error = None, exc
    else:
        offer = None
    offer = comm.bcast(offer if error is None else ("error", str(error), host), root=0)
    if offer[0] == "error":
        raise error or RendezvousError(offer[1])
    address, port, master_host = offer
    try:
        problem = probe(address, port, timeout_s)
        outcomes = comm.allgather((rank, host, problem))
    finally:
        if listener is not None:
            listener.close()
    failed = [(r, h, p) for r, h, p in outcomes if p is not None]
    if failed:
        lines = "; ".join(f"rank {r} on host {h} cannot connect: {p}" for r, h, p in failed)
        raise RendezvousError(
            f"rank 0's address {address}:{port} (host {master_host}) is unreachable from {len(failed)} of "
            f"{size} rank(s) ({lines}). Set distributed.rendezvous_interface to an interface the other "
            "nodes reach, or export MASTER_ADDR (and MASTER_PORT) to every rank"
        )
    if rank == 0:
        print(f"shardtune: MPI rendezvous at {address}:{port} on host {host}, reached by all {size} rank(s)",
              file=sys.stderr, flush=True)
    return replace(env, local_rank=local_rank, local_world_size=local_size, node_rank=node_rank,
                   master_addr=address, master_port=port, rendezvous="done")
