"""Object store on S3 (or any S3-compatible endpoint: MinIO, Ceph, moto_server) through boto3."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from llmfab.errors import StoreError
from llmfab.storage.base import ObjectStore
from llmfab.storage.keys import join_key, validate_key

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


def endpoint_from_env() -> str | None:
    """The S3 endpoint the ecosystem's variables name (boto3 reads the AWS_* ones itself too)."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def make_client(endpoint_url: str | None = None, max_attempts: int = 8):
    import boto3
    from botocore.config import Config

    # "standard" retry mode retries throttling, 5xx and connection errors with backoff.
    # Checksums only where the API requires them: the default streams uploads as aws-chunked with
    # trailers, which many S3-compatible servers and proxies reject; checkpoints carry sha256 anyway.
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if (endpoint_url or endpoint_from_env()) else None,
    )
    return boto3.client("s3", endpoint_url=endpoint_url or endpoint_from_env(), config=config)


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        endpoint_url: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
    ):
        self.bucket = bucket
        self.prefix = validate_key(prefix) if prefix else ""
        self.endpoint_url = endpoint_url
        self.client = client or make_client(endpoint_url)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def sub(self, prefix: str) -> S3Store:
        return S3Store(
            self.bucket,
            join_key(self.prefix, prefix),
            client=self.client,
            endpoint_url=self.endpoint_url,
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
        )

    def _key(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            use_threads=True,
        )

    def put_file(self, key: str, path: str | Path) -> None:
        # A PUT (or a completed multipart upload) is atomic: readers see the old object or the new one.
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer_config())

    def get_file(self, key: str, path: str | Path) -> None:
        from botocore.exceptions import ClientError

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self._transfer_config())
        except ClientError as exc:
            tmp.unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise StoreError(f"no object {self.uri_for(key)}") from exc
            raise
        os.replace(tmp, path)

    def _head(self, key: str):
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise StoreError(f"no object {self.uri_for(key)}")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        full = join_key(self.prefix, prefix) if (self.prefix or prefix) else ""
        # A trailing '/' keeps "ckpt-1" from matching "ckpt-10".
        query = f"{full}/" if full else ""
        strip = f"{self.prefix}/" if self.prefix else ""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=query):
            # Skip folder markers ("prefix/") that consoles and some servers create.
            keys.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
