"""Helpers shared by the test suite and benchmarks/soak.py, the longer soak suite: a local
``mlflow server`` and the pieces the fuzzers use to take YAML trees and .cpz files apart.

Not a test module. compresspipe is imported inside the functions: soak.py imports this module
before it has chosen which copy of compresspipe its runs use.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with an sqlite backend under ``root``, in its own process group so that
    stopping it stops its workers too. ``start()``/``stop()`` (restartable on the same port), or
    ``with MlflowServer(root) as server:``."""

    def __init__(self, root: Path, workers: int = 1, start_timeout: float = 120.0):
        self.root, self.port = root, free_port()
        self.workers, self.start_timeout = workers, start_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> None:
        """Starts the server and waits until ``/health`` answers."""
        self._launch(["server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                      "--artifacts-destination", str(self.root / "artifacts"),
                      "--host", "127.0.0.1", "--port", str(self.port),
                      "--workers", str(self.workers)], "server.log", "/health")

    def _launch(self, args: list[str], log_name: str, probe: str,
                env: dict[str, str] | None = None) -> None:
        """Run ``mlflow ARGS`` in its own process group and wait until ``probe`` answers 200."""
        exe = Path(sys.executable).with_name("mlflow")
        cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]) + args
        log = self.root / log_name
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self.log, stderr=self.log,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow {args[0]} exited; {log}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}{probe}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow {args[0]} not up after {self.start_timeout} s")

    def stop(self) -> None:
        """Stops the server and waits until its port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
        # the port must refuse connections now, or an outage test would test nothing
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ModelServer(MlflowServer):
    """``mlflow models serve -m MODEL_URI --env-manager local`` on 127.0.0.1, resolving
    ``models:/`` URIs in the tracking store ``store``; ``invocations(body)`` posts to it."""

    def __init__(self, root: Path, model_uri: str, store: str, start_timeout: float = 120.0):
        super().__init__(root, start_timeout=start_timeout)
        self.model_uri, self.store = model_uri, store

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        # the server runs `uvicorn` from PATH: the venv's bin first, as in an activated venv
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": self.store,
               "MLFLOW_REGISTRY_URI": self.store,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                             if p)}
        self._launch(["models", "serve", "-m", self.model_uri, "--env-manager", "local",
                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                     "serve.log", "/ping", env)

    def invocations(self, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())


# -- fuzzing: trees and .cpz files ----------------------------------------------------------------


def yaml_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into a YAML/JSON tree, the root's ``()`` first."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += yaml_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += yaml_paths(value, (*prefix, i))
    return out


def cpz_split(data: bytes) -> tuple[Any, Any, bytes]:
    """(metadata, section table, payload) of a well-formed .cpz file."""
    from compresspipe.formats import cpz

    body = data[: -cpz._DIGEST_SIZE]
    pos, sections = cpz._HEADER.size, []
    for _ in range(2):
        length, _crc = cpz._SECTION.unpack_from(body, pos)
        sections.append(json.loads(body[pos + cpz._SECTION.size: pos + cpz._SECTION.size + length]))
        pos += cpz._SECTION.size + length
    return sections[0], sections[1], body[pos:]


def cpz_assemble(meta: Any, table: Any, payload: bytes) -> bytes:
    """A .cpz file with every length and checksum valid, whatever the sections say."""
    from compresspipe.formats import cpz

    blocks = [json.dumps(s, allow_nan=False).encode() for s in (meta, table)]
    size = cpz._HEADER.size + sum(cpz._SECTION.size + len(b) for b in blocks) + len(payload) \
        + cpz._DIGEST_SIZE
    out = cpz._HEADER.pack(cpz.MAGIC, cpz.VERSION, 0, size)
    for b in blocks:
        out += cpz._SECTION.pack(len(b), zlib.crc32(b)) + b
    out += payload
    return out + hashlib.blake2b(out, digest_size=cpz._DIGEST_SIZE).digest()


def cpz_reseal(body: bytes) -> bytes:
    """Fixes the header length and appends the file digest to mutated bytes (without the
    digest); the section crcs are left as they are."""
    from compresspipe.formats import cpz

    body = bytearray(body)
    if len(body) >= cpz._HEADER.size:
        struct.pack_into("<Q", body, 8, len(body) + cpz._DIGEST_SIZE)
    return bytes(body) + hashlib.blake2b(bytes(body), digest_size=cpz._DIGEST_SIZE).digest()


def cpz_blob_refs(node: Any) -> list[dict]:
    """Every {offset, length, crc32} reference in a .cpz section table."""
    if isinstance(node, dict):
        own = [node] if {"offset", "length", "crc32"} <= set(node) else []
        return own + [r for v in node.values() for r in cpz_blob_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in cpz_blob_refs(v)]
    return []


def cpz2_split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(metadata JSON, binary section table, payload) of a well-formed version-2 .cpz file,
    both blocks inflated."""
    from compresspipe.formats import cpz
    from compresspipe.formats.cpz.table import parse_block

    body = data[: -cpz._DIGEST_SIZE]
    pos, blocks = cpz._HEADER.size, []
    for _ in range(2):
        length, _crc = cpz._SECTION.unpack_from(body, pos)
        raw = body[pos + cpz._SECTION.size: pos + cpz._SECTION.size + length]
        blocks.append(parse_block(raw, "test"))
        pos += cpz._SECTION.size + length
    return blocks[0], blocks[1], body[pos:]


def cpz2_assemble(meta: bytes, table: bytes, payload: bytes) -> bytes:
    """A version-2 .cpz file with every length and checksum valid, whatever the blocks say."""
    from compresspipe.formats import cpz
    from compresspipe.formats.cpz.table import pack_block

    blocks = [pack_block(meta), pack_block(table)]
    size = cpz._HEADER.size + sum(cpz._SECTION.size + len(b) for b in blocks) + len(payload) \
        + cpz._DIGEST_SIZE
    out = cpz._HEADER.pack(cpz.MAGIC, cpz.VERSION, 0, size)
    for b in blocks:
        out += cpz._SECTION.pack(len(b), zlib.crc32(b)) + b
    out += payload
    return out + hashlib.blake2b(out, digest_size=cpz._DIGEST_SIZE).digest()


def shipped_model_bytes(directory: Path, model_files: list[str], scratch: Path) -> int:
    """Bytes of a stage's deployable files. An fp32 stage keeps its tensors in the runner's
    store, not as model.safetensors: that file is written anew (as the runner measures it)."""
    # lazy: harness's other helpers are used by tests that never import compresspipe
    import compresspipe
    from compresspipe.core.artifact import Artifact

    files = [directory / f for f in model_files]
    if not all(f.is_file() for f in files):
        loaded = compresspipe.load(directory)
        Artifact(model=loaded.model, spec=loaded.spec).save(scratch)
        files = [scratch / f for f in model_files]
    return sum(f.stat().st_size for f in files)
