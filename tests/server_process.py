"""A real `m3db serve` process on a free port, for the server's tests and benchmark."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m m3db.cli serve PATHS... ARGS...` (or `python SCRIPT PATHS... PORT ARGS...`) until
    stop(); its log goes to a file (a pipe nobody reads would fill with access logs and block
    the server)."""

    def __init__(self, paths, *args, api_key=None, timeout=60.0, script=None, sends_key=None):
        """api_key: passed as --api-key and sent by client(); sends_key: sent, not passed (a key
        of a --keys file)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key or sends_key
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=str(ROOT), M3DB_API_KEY="")
        cmd = [sys.executable, "-m", "m3db.cli", "serve", *map(str, paths), "--port", str(self.port), *args]
        if script is not None:  # a Python program of the caller's, taking PATHS... PORT
            cmd = [sys.executable, str(script), *map(str, paths), str(self.port), *args]
        if api_key:
            cmd.append(f"--api-key={api_key}")  # one argument: a key may start with "-" (token_urlsafe)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"m3db serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"m3db serve did not answer within {timeout} s:\n{self.output()}")
            time.sleep(0.1)

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def output(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30.0) -> int:
        """Send `sig`, wait for the exit, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)
