"""Pools where they live: shards and files named by URL, read as streams.

``https://``, ``s3://``, ``gs://``, ``hf://`` and every other protocol fsspec knows are opened
through fsspec and its protocol packages (an optional extra: ``pip install 'noisystudent[remote]'``
brings fsspec, aiohttp and s3fs; gcsfs for ``gs://``), imported only when a URL is read.
Credentials and endpoints come from where those packages look (``AWS_*`` variables and
``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables
such as ``FSSPEC_S3_ENDPOINT_URL``). ``pipe:COMMAND`` runs ``COMMAND`` in a shell and reads its
standard output, as webdataset users write it.

A stream that fails part-way (a dropped connection, a command that exits non-zero) is reopened
and read on from the byte it had reached, at most ``retries`` times per stream; then it stops with
a :class:`ShardReadError` naming the URL. Written here rather than taken from webdataset's
``gopen``: that shells out to curl or gsutil for http and gs (binaries a machine may lack) and
restarts nothing mid-stream.
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

from ...runtime.errors import DataError, error_reason

SHARD_RETRIES = 3  # reopenings of one stream before its error stops the run
RETRY_DELAY_S = 0.5  # before the first reopening; doubled before each next one
READ_CHUNK = 1 << 20  # bytes asked of the transport at a time (fsspec's http reads cost a thread hop each)
EXTRA_HINT = "pip install 'noisystudent[remote]'"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ShardReadError(DataError):
    """A stream that could not be read to its end, even after retries."""


def is_url(text: str) -> bool:
    """Whether ``text`` names a stream rather than a local path: ``pipe:COMMAND`` or ``scheme://...``."""
    return text.startswith("pipe:") or bool(_SCHEME.match(text))


def url_path(url: str) -> str:
    """The path part of a URL (the command's last ``.tar`` argument for ``pipe:``), for naming."""
    if url.startswith("pipe:"):
        words = url[5:].split()
        tars = [w for w in words if ".tar" in w or ".tgz" in w]
        url = (tars or words or [""])[-1]
        if not is_url(url):
            return url
    return urlsplit(url).path


def join_url(base: str, line: str) -> str:
    """``line`` (a URL, or a path relative to ``base``'s folder) as a URL."""
    if is_url(line):
        return line
    return base.rstrip("/") + "/" + line.lstrip("/")


def _fsspec(url: str):
    try:
        import fsspec
    except ImportError:
        raise DataError(f"reading {url} needs fsspec: {EXTRA_HINT}") from None
    return fsspec


def url_to_fs(url: str):
    """fsspec's filesystem and path for ``url``; a missing protocol package is a one-line error."""
    fsspec = _fsspec(url)
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # fsspec: "Install s3fs to access S3", "Protocol not known"
        raise DataError(f"cannot read {url}: {error_reason(e)} ({EXTRA_HINT})") from None


def check_exists(url: str) -> None:
    """Raise a one-line :class:`DataError` unless ``url`` can be reached and exists (``pipe:`` is
    not checked: running the command is the only way to know)."""
    if url.startswith("pipe:"):
        return
    fs, path = url_to_fs(url)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise DataError(f"not found: {url}") from None
    except Exception as e:  # noqa: BLE001 - whatever the transport raises (aiohttp, botocore): one line
        raise DataError(f"cannot reach {url}: {error_reason(e, with_type=True)}") from None


class _PipeStream(io.RawIOBase):
    """The standard output of a shell command; its exit status is checked at the end of the stream."""

    def __init__(self, command: str):
        self.command = command
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command can never block on it
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0 and self.proc.wait() != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"command exited with status {self.proc.returncode}"
                          + (f": {said[-1]}" if said else ""))
        return n

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:  # a reader that stops early: the command is not needed
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.wait()
            self.stderr.close()
        super().close()


def open_raw(url: str):
    """``url`` opened for reading once, without retries (a binary file object)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[5:])
    if not is_url(url):
        return open(url, "rb")
    fs, path = url_to_fs(url)
    # http(s): a plain streamed GET; the default (block_size > 0) would make one range request per block.
    options = {"block_size": 0} if urlsplit(url).scheme in ("http", "https") else {}
    return fs.open(path, "rb", **options)


_NOT_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError, DataError)


class RetryingReader(io.RawIOBase):
    """Reads ``url`` from its first byte to its last; when a read fails, reopens it and reads on
    from the byte reached (seeking where the stream can, else skipping), up to ``retries`` times.
    A stream that ends before the size its transport announced counts as a failure."""

    def __init__(self, url: str, retries: int = SHARD_RETRIES, delay_s: float = RETRY_DELAY_S, opener=open_raw):
        self.url, self.retries, self.delay_s, self.opener = url, int(retries), float(delay_s), opener
        self.pos = 0
        self.failures = 0
        self._stream = None
        self._size: int | None = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        stream = self.opener(self.url)
        self._stream = stream
        size = getattr(stream, "size", None)
        self._size = size if isinstance(size, int) and size > 0 else None
        if self.pos:
            try:
                stream.seek(self.pos)
            except (OSError, ValueError, NotImplementedError, io.UnsupportedOperation):
                left = self.pos  # a stream that cannot seek (http streamed, pipe): read past what was read
                while left:
                    chunk = stream.read(min(left, READ_CHUNK))
                    if not chunk:
                        raise ConnectionError(f"the reopened stream ended at byte {self.pos - left}")
                    left -= len(chunk)

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too; it is gone anyway
                pass

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self._stream is None:
                    self._open()
                data = self._stream.read(len(buffer))
                if not data and self._size is not None and self.pos < self._size:
                    raise ConnectionError(f"the stream ended at byte {self.pos} of {self._size}")
                buffer[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except _NOT_RETRIED as e:
                self._drop_stream()
                if isinstance(e, FileNotFoundError):
                    raise ShardReadError(f"{self.url}: not found") from None
                if isinstance(e, DataError):
                    raise
                raise ShardReadError(f"{self.url}: {error_reason(e, with_type=True)}") from None
            except Exception as e:  # noqa: BLE001 - transports raise many types (aiohttp, botocore, OSError)
                self._drop_stream()
                self.failures += 1
                if self.failures > self.retries:
                    raise ShardReadError(f"{self.url} could not be read (failed {self.failures} times, last at "
                                         f"byte {self.pos}: {error_reason(e, with_type=True)})") from None
                time.sleep(self.delay_s * 2 ** (self.failures - 1))

    def close(self) -> None:
        self._drop_stream()
        super().close()


def open_stream(url: str, retries: int = SHARD_RETRIES, delay_s: float = RETRY_DELAY_S) -> io.BufferedReader:
    """``url`` (a local path, ``pipe:COMMAND`` or any fsspec URL) as a buffered binary stream that
    survives ``retries`` failures part-way (:class:`RetryingReader`)."""
    return io.BufferedReader(RetryingReader(url, retries, delay_s), buffer_size=READ_CHUNK)


def read_url(url: str) -> bytes:
    """The whole of ``url`` (a file-list item that lives in object storage), with retries."""
    with open_stream(url) as f:
        return f.read()
