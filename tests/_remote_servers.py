"""Servers on 127.0.0.1 for the remote-pool tests: a shard server built on http.server (with a
connection that drops part-way, and a gate that holds a shard back), and moto's S3 server."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path


class ShardServer:
    """Serves ``root`` over HTTP on 127.0.0.1 in a thread. ``drop[name] = n``: the next ``n`` GETs of
    ``/name`` send half the file then close the connection; ``hold[name]``: an Event the GET of
    ``/name`` waits for. ``gets`` counts GETs by name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.drop: Counter = Counter()
        self.hold: dict[str, threading.Event] = {}
        self.gets: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                with server.lock:
                    server.gets[name] += 1
                    drop = server.drop[name] > 0
                    if drop:
                        server.drop[name] -= 1
                gate = server.hold.get(name)
                if gate is not None:
                    gate.wait(timeout=120)
                f = self.send_head()
                if f is None:
                    return
                with f:
                    if not drop:
                        with contextlib.suppress(OSError):
                            shutil.copyfileobj(f, self.wfile)
                        return
                    data = f.read()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for gate in self.hold.values():
            gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1 (never an outside address); fsspec's s3 reads it through
    FSSPEC_S3_ENDPOINT_URL, with dummy credentials. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)  # what a user sets; fsspec reads it when imported
    import fsspec.config
    import s3fs

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # this process imported it already
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def upload_to_s3(endpoint: str, local: Path, bucket: str, pattern: str = "*") -> None:
    """The files of ``local`` matching ``pattern`` into ``s3://bucket/`` (same relative names)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
    fs.makedirs(bucket, exist_ok=True)  # moto keeps its buckets per process, across servers
    for path in sorted(Path(local).glob(pattern)):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/{path.relative_to(local).as_posix()}")


__all__ = ["ShardServer", "s3_server", "upload_to_s3"]
