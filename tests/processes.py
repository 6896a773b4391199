"""Real processes for end-to-end tests: free loopback ports, logged child processes that are
always ended (with their whole process group), a throwaway ``redis-server``, and a Redis Cluster
of such servers."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class Process:
    """A child process whose output goes to a log file, ended by :meth:`stop` in any case."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, **kwargs: Any) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self._log.close()


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port, no persistence; stoppable and restartable."""

    def __init__(self, directory: Path, extra_args: list[str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed host would, without a goodbye to its peers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


class RedisCluster:
    """A Redis Cluster on loopback ports: ``primaries`` primaries with ``replicas`` replicas each,
    made with ``redis-cli --cluster create``. Nodes fail over on their own after
    ``node_timeout_ms`` without a primary; a lost shard does not stop the others
    (``cluster-require-full-coverage no``), and Redis evicts the keys closest to expiry when full
    (``volatile-ttl``), as ``docs/scaling.md`` asks of a production cluster."""

    def __init__(self, directory: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.nodes: list[RedisServer] = []
        for i in range(primaries * (1 + replicas)):
            node_dir = directory / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_dir, port=free_cluster_port(), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                "--maxmemory-policy", "volatile-ttl",
            ]))
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        assert REDIS_CLI is not None
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )
            self.wait_until(lambda: all(self.state(n) == "ok" for n in self.nodes), timeout, "cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def wait_until(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if condition():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster: no {what} after {timeout:g} s")
            time.sleep(0.05)

    @staticmethod
    def state(node: RedisServer) -> str:
        info = node.client().execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return str(info["cluster_state"])

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    def primary_for_slot(self, slot: int) -> RedisServer:
        """The node serving ``slot`` now, as the live nodes see it."""
        for start, end, primary, *_ in self.alive()[0].client().execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise KeyError(slot)

    def primary_for_key(self, key: str) -> RedisServer:
        return self.primary_for_slot(int(self.alive()[0].client().execute_command("CLUSTER KEYSLOT", key)))

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A replica of ``primary``, once it has caught up with everything written to it."""
        client = primary.client()
        node_id = client.execute_command("CLUSTER MYID")
        node_id = node_id.decode() if isinstance(node_id, bytes) else node_id
        for node in self.alive():
            if node is primary:
                continue
            info = node.client().info("replication")
            if info.get("role") == "slave" and info.get("master_port") == primary.port:
                offset = client.info("replication")["master_repl_offset"]
                self.wait_until(lambda n=node, o=offset: n.client().info("replication")["slave_repl_offset"] >= o,
                                10, "replica in sync")
                return node
        raise KeyError(f"no replica of {node_id}")
