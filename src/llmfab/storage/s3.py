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
DEFAULT_MAX_ATTEMPTS = 8


def _s3_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises once its retries are spent: HTTP errors, connection errors and timeouts, failed transfers."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError, S3UploadFailedError, S3TransferFailedError


def _not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code in ("404", "NoSuchKey", "NotFound")


def endpoint_from_env() -> str | None:
    """The S3 endpoint the ecosystem's variables name (boto3 reads the AWS_* ones itself too)."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _max_attempts() -> int:
    """AWS_MAX_ATTEMPTS (botocore's own variable, which an explicit retry config would otherwise hide), else 8."""
    text = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
    if not text.isdigit() or int(text) < 1:
        raise StoreError(f"AWS_MAX_ATTEMPTS={text!r}: expected a positive integer")
    return int(text)


def make_client(
    endpoint_url: str | None = None,
    max_attempts: int | None = None,
    *,
    connect_timeout: float = 10,
    read_timeout: float = 120,
):
    import boto3
    from botocore.config import Config

    # "standard" retry mode retries throttling, 5xx, timeouts and connection errors with exponential backoff
    # (jittered, capped at 20 s), `max_attempts` tries in all (AWS_MAX_ATTEMPTS, default 8).
    # Checksums only where the API requires them: the default streams uploads as aws-chunked with
    # trailers, which many S3-compatible servers and proxies reject; checkpoints carry sha256 anyway.
    config = Config(
        retries={"max_attempts": max_attempts or _max_attempts(), "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
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

    def _failed(self, action: str, key: str, exc: Exception) -> StoreError:
        """A boto3 error, once its retries are spent, as a StoreError naming the object and the endpoint."""
        where = self.uri_for(key) if key else self.uri
        endpoint = getattr(self.client.meta, "endpoint_url", None) or "AWS"
        return StoreError(f"S3 {action} {where} failed (endpoint {endpoint}): {exc}")

    def put_file(self, key: str, path: str | Path) -> None:
        # A PUT (or a completed multipart upload) is atomic: readers see the old object or the new one. A failed
        # multipart upload is aborted by boto3's transfer manager, so no part of it becomes an object.
        full = self._key(key)
        try:
            self.client.upload_file(str(path), self.bucket, full, Config=self._transfer_config())
        except _s3_errors() as exc:
            raise self._failed("upload to", key, exc) from exc

    def get_file(self, key: str, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        full = self._key(key)
        try:
            self.client.download_file(self.bucket, full, str(tmp), Config=self._transfer_config())
        except _s3_errors() as exc:
            tmp.unlink(missing_ok=True)
            if _not_found(exc):
                raise StoreError(f"no object {self.uri_for(key)}") from exc
            raise self._failed("download of", key, exc) from exc
        os.replace(tmp, path)

    def _head(self, key: str):
        full = self._key(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except _s3_errors() as exc:
            if _not_found(exc):
                return None
            raise self._failed("HEAD of", key, exc) from exc

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
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=query):
                # Skip folder markers ("prefix/") that consoles and some servers create.
                keys.extend(
                    obj["Key"][len(strip) :] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
                )
        except _s3_errors() as exc:
            raise self._failed("listing of", prefix, exc) from exc
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except _s3_errors() as exc:
            raise self._failed("delete of", key, exc) from exc
