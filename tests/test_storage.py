import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmfab.errors import StoreError
from llmfab.storage import LocalStore, open_store
from llmfab.storage.keys import parse_uri, validate_key
from llmfab.storage.s3 import S3Store


@pytest.mark.parametrize("key", ["", "/abs/path", "a/../b", "..", "a//b", "./a", "a\\b", "a/\x00"])
def test_bad_keys_rejected(key):
    with pytest.raises(StoreError, match="invalid object key"):
        validate_key(key)


def test_good_keys_normalised():
    assert validate_key("a/b/c.txt") == "a/b/c.txt"
    assert validate_key("a/b/") == "a/b"


def test_parse_uri(tmp_path):
    assert parse_uri("s3://bucket/some/prefix").root == "bucket/some/prefix"
    assert parse_uri("s3://bucket").root == "bucket"
    assert parse_uri(tmp_path).root == str(tmp_path)
    assert parse_uri(tmp_path.as_uri()).root == str(tmp_path)
    with pytest.raises(StoreError, match="unsupported store URI"):
        parse_uri("gs://bucket/x")
    with pytest.raises(StoreError, match="missing bucket"):
        parse_uri("s3:///x")
    with pytest.raises(StoreError, match="invalid object key"):
        parse_uri("s3://bucket/a/../b")


def test_roundtrip(store, tmp_path):
    store.put_text("a/b.txt", "hello")
    store.put_bytes("a/c.bin", b"\x00\x01")
    store.put_text("ab/d.txt", "x")
    assert store.get_text("a/b.txt") == "hello"
    assert store.get_bytes("a/c.bin") == b"\x00\x01"
    assert store.exists("a/b.txt") and not store.exists("a/missing")
    assert store.size("a/b.txt") == 5
    # A prefix lists only what is below it as a folder: "a" must not match "ab/...".
    assert list(store.list("a")) == ["a/b.txt", "a/c.bin"]
    assert list(store.list()) == ["a/b.txt", "a/c.bin", "ab/d.txt"]
    sub = store.sub("a")
    assert sub.get_text("b.txt") == "hello"
    assert sub.uri == store.uri_for("a")
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting twice is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(StoreError, match="no object"):
        store.get_text("a/b.txt")
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_text("../escape", "x")


def test_put_get_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "nested" / "two.txt").write_text("2")
    assert store.put_dir("d", src) == ["nested/two.txt", "one.txt"]
    out = tmp_path / "out"
    assert sorted(store.get_dir("d", out)) == ["nested/two.txt", "one.txt"]
    assert (out / "nested" / "two.txt").read_text() == "2"


def test_open_store_default_and_s3(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMFAB_STORE", str(tmp_path / "here"))
    assert isinstance(open_store(), LocalStore)
    assert open_store().uri == (tmp_path / "here").as_uri()
    s3 = open_store("s3://bucket/pre/fix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "pre/fix"


def test_s3_multipart_upload(s3_bucket, tmp_path):
    # 5 MiB is S3's minimum part size; a 12 MiB file goes up in three parts.
    store = S3Store(s3_bucket, "mp", multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 4096))
    store.put_file("big.bin", big)
    head = store.client.head_object(Bucket=s3_bucket, Key="mp/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), "multipart ETags end in -<parts>"
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


class _FlakyProxy(BaseHTTPRequestHandler):
    """Fails the first `failures` requests with 503 SlowDown, then forwards to the real endpoint."""

    failures = 0
    seen = 0
    upstream = ""

    def _handle(self):
        import urllib.error
        import urllib.request

        cls = type(self)
        cls.seen += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if cls.failures > 0:
            cls.failures -= 1
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "expect")}
        # urllib would label a bare body as a form, which the server then parses away.
        headers.setdefault("Content-Type", "binary/octet-stream")
        req = urllib.request.Request(cls.upstream + self.path, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req) as resp:
                status, resp_headers, data = resp.status, resp.headers.items(), resp.read()
        except urllib.error.HTTPError as err:
            status, resp_headers, data = err.code, err.headers.items(), err.read()
        self.send_response(status)
        for key, value in resp_headers:
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        upstream_length = dict((k.lower(), v) for k, v in resp_headers).get("content-length")
        self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args):
        pass


def test_s3_retries_transient_errors(s3_bucket, s3_endpoint):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    _FlakyProxy.upstream, _FlakyProxy.failures, _FlakyProxy.seen = s3_endpoint, 3, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store(s3_bucket, "flaky", endpoint_url=f"http://127.0.0.1:{server.server_port}")
        store.put_text("x.txt", "survived")
        assert _FlakyProxy.seen >= 4, "the three 503s were retried"
        assert store.get_text("x.txt") == "survived"
    finally:
        server.shutdown()


def test_file_uris_round_trip_odd_paths(tmp_path):
    odd = tmp_path / "a b#c" / "é"
    store = open_store(odd)
    store.put_text("x.txt", "ok")
    assert "%20" in store.uri
    assert open_store(store.uri).get_text("x.txt") == "ok"
    assert parse_uri(odd.as_uri().replace("file://", "file://localhost")).root == str(odd)
    with pytest.raises(StoreError, match="this host only"):
        parse_uri("file://otherhost/x")


def test_s3_folder_markers_are_not_keys(s3_bucket):
    store = S3Store(s3_bucket, "p")
    store.client.put_object(Bucket=s3_bucket, Key="p/dir/", Body=b"")
    store.put_text("dir/file.txt", "x")
    assert list(store.list()) == ["dir/file.txt"]
