import json

import pytest

from llmfab.errors import CheckpointError
from llmfab.storage.checkpoint import (
    MANIFEST,
    fetch_checkpoint,
    is_checkpoint,
    latest_step_checkpoint,
    read_manifest,
    step_name,
    write_checkpoint,
)


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"w" * 1000)
    (d / "sub" / "config.json").write_text('{"a": 1}')
    return d


def test_write_then_fetch(store, ckpt_dir, tmp_path):
    uri = write_checkpoint(store.sub("c1"), ckpt_dir, meta={"step": 3})
    assert uri == store.uri_for("c1")
    manifest = read_manifest(store.sub("c1"))
    assert manifest["meta"] == {"step": 3}
    assert manifest["files"]["weights.bin"]["size"] == 1000
    local = fetch_checkpoint(uri)
    assert (local / "weights.bin").read_bytes() == b"w" * 1000
    assert json.loads((local / "sub" / "config.json").read_text()) == {"a": 1}


def test_incomplete_checkpoint_refused(store, ckpt_dir):
    # Files without a manifest: what a crash mid-upload leaves behind.
    store.put_dir("partial", ckpt_dir)
    assert not is_checkpoint(store.sub("partial"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        fetch_checkpoint(store.sub("partial"))


def test_corrupt_file_refused(store, ckpt_dir, tmp_path):
    write_checkpoint(store.sub("c"), ckpt_dir)
    store.put_bytes("c/weights.bin", b"x" * 1000)  # same size, other bytes
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_checkpoint(store.sub("c"), dest=tmp_path / "dl")
    store.put_bytes("c/weights.bin", b"x")
    with pytest.raises(CheckpointError, match="size"):
        fetch_checkpoint(store.sub("c"), dest=tmp_path / "dl2")
    store.delete("c/weights.bin")
    with pytest.raises(CheckpointError, match="missing"):
        fetch_checkpoint(store.sub("c"), dest=tmp_path / "dl3")
    assert not (tmp_path / "dl3").exists(), "a failed fetch leaves no folder that looks complete"


def test_bad_manifest_json(store, ckpt_dir):
    write_checkpoint(store.sub("c"), ckpt_dir)
    store.put_text(f"c/{MANIFEST}", "{not json")
    with pytest.raises(CheckpointError, match="invalid JSON at line 1"):
        read_manifest(store.sub("c"))


def test_overwrite_drops_stale_files(store, ckpt_dir, tmp_path):
    write_checkpoint(store.sub("c"), ckpt_dir)
    (ckpt_dir / "weights.bin").unlink()
    (ckpt_dir / "new.bin").write_bytes(b"n")
    write_checkpoint(store.sub("c"), ckpt_dir)
    assert sorted(store.sub("c").list()) == [MANIFEST, "new.bin", "sub/config.json"]


def test_latest_step_ignores_incomplete(store, ckpt_dir):
    write_checkpoint(store.sub(f"ckpts/{step_name(10)}"), ckpt_dir)
    write_checkpoint(store.sub(f"ckpts/{step_name(20)}"), ckpt_dir)
    store.put_dir(f"ckpts/{step_name(30)}", ckpt_dir)  # crashed before its manifest
    step, latest = latest_step_checkpoint(store.sub("ckpts"))
    assert step == 20
    assert latest.uri.endswith(step_name(20))
    assert latest_step_checkpoint(store.sub("nothing-here")) is None


def test_remote_fetch_is_cached(s3_bucket, ckpt_dir):
    from llmfab.storage import open_store

    store = open_store(f"s3://{s3_bucket}/ck")
    write_checkpoint(store, ckpt_dir)
    first = fetch_checkpoint(store.uri)
    store.put_bytes("weights.bin", b"tampered after fetch")
    assert fetch_checkpoint(store.uri) == first  # same manifest -> cached folder, no download
    assert (first / "weights.bin").read_bytes() == b"w" * 1000


def test_checkpoint_may_not_contain_manifest(store, ckpt_dir):
    (ckpt_dir / MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match="may not contain"):
        write_checkpoint(store.sub("c"), ckpt_dir)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "unknown format 'list'"),
        ('{"format": "llmfab-checkpoint/1", "files": {"w": {"size": "big"}}}', "files.w: needs an integer size"),
    ],
)
def test_malformed_manifest(store, ckpt_dir, text, message):
    write_checkpoint(store.sub("c"), ckpt_dir)
    store.put_text(f"c/{MANIFEST}", text)
    with pytest.raises(CheckpointError, match=message):
        read_manifest(store.sub("c"))
