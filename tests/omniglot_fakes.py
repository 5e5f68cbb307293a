"""What the Omniglot data tests share: hiding the real archives, rewriting
zips, and a real HTTP server on 127.0.0.1 that serves (or mangles) archives."""

import collections
import http.server
import threading
import zipfile

from mtl_keras.data import omniglot


def hide_archives(monkeypatch, tmp_path, *, download_from=None):
    """Hides every default location of the archives.

    Downloads are forbidden unless `download_from` (a base URL) is given:
    then they go there, never to the internet.
    """
    for name in (
        omniglot.OMNIGLOT_DIR_ENV,
        omniglot.OMNIGLOT_URL_ENV,
        omniglot.OMNIGLOT_CHECKSUMS_ENV,
        "TFDS_DATA_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    if download_from is None:
        monkeypatch.setenv(omniglot.NO_DOWNLOAD_ENV, "1")
    else:
        monkeypatch.delenv(omniglot.NO_DOWNLOAD_ENV, raising=False)
        monkeypatch.setenv(omniglot.OMNIGLOT_URL_ENV, download_from)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(omniglot, "_REPO_ROOT", tmp_path / "repo" / "main")
    monkeypatch.chdir(tmp_path)


def rewrite_zip(
    src,
    dst,
    *,
    keep=lambda name: True,
    rename=lambda name: name,
    content=lambda name, data: data,
    compression=zipfile.ZIP_DEFLATED,
):
    """Copies a zip member by member, optionally dropping, renaming,
    changing members or packing them differently."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            if keep(info.filename):
                zout.writestr(rename(info.filename), content(info.filename, zin.read(info.filename)))


class ArchiveServer:
    """A real HTTP/1.0 server on 127.0.0.1, in a thread, serving files by name.

    Modes of a file: `"full"`; `"truncated"` (announces the full
    Content-Length, sends half, closes); `"no_length"` (no Content-Length,
    sends half, closes); `"stall"` (sends half, then waits until `close()`).
    `requests` counts the GETs of each name.
    """

    def __init__(self):
        self.files = {}
        self.requests = collections.Counter()
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                data, mode = server.files[name]
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                if mode != "no_length":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "full":
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server._release.wait(120)

            def log_message(self, *args):
                pass  # Keep the test output clean.

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def serve(self, name, data, mode="full"):
        self.files[name] = (bytes(data), mode)

    def close(self):
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
