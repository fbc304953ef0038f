"""The run store: where finished runs live, a local directory or `s3://bucket/prefix`.

A run is the folder `<store>/<run_id>/`: its artifacts plus `manifest.json`, which
records every artifact's sha256 and is written last, so its presence marks the
run complete. Writes go to a temporary file/key first and are renamed/copied into
place, so a crash never leaves a half artifact under its final name. Reads verify
the sha256 when one is known.

S3 goes through boto3 (imported only when an s3:// store is opened) with the
standard AWS configuration: AWS_ENDPOINT_URL (any S3-compatible server),
AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE, AWS_ACCESS_KEY_ID... A caller that
holds credentials elsewhere (a Prefect AwsCredentials block) passes its boto3
client: `open_store(uri, client=block.get_s3_client())`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from distill.data import write_chunks, write_text

CHUNK = 1 << 20


class StoreError(RuntimeError):
    """A store problem: missing bucket/run/artifact, access denied, checksum mismatch."""


def is_temp_name(name: str) -> bool:
    """Temporary files of the atomic writers (`.name.XXXX.tmp`); never published or listed."""
    return name.startswith(".") and name.endswith(".tmp")


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in key:
        raise StoreError(f"invalid store key {key!r}: expected a relative path like run_id/file")
    return key


def _verify(where: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise StoreError(f"{where}: sha256 mismatch (expected {expected}, found {actual}); "
                         "the artifact is corrupt or was changed after the run")


def file_sha256(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class LocalStore:
    """A directory; keys are relative paths under it."""

    def __init__(self, root: str | Path):
        """Args: root: the store directory (created on first write)."""
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url(self, key: str) -> str:
        return str(self._path(key).absolute())

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, local_path: str | Path, key: str) -> dict[str, Any]:
        """Copy a file to `key` atomically. Returns {"key", "sha256", "bytes"}."""
        src, dest = Path(local_path), self._path(key)
        if not src.is_file():
            raise StoreError(f"{src}: file not found (publishing {key})")
        if dest.exists() and dest.resolve() == src.resolve():
            # The run was assembled inside the store: copying a file onto itself would truncate it.
            sha, size = file_sha256(src)
            return {"key": key, "sha256": sha, "bytes": size}

        def chunks():
            with src.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return {"key": key, **write_chunks(dest, chunks())}

    def put_bytes(self, data: bytes, key: str) -> dict[str, Any]:
        """Write bytes to `key` atomically. Returns {"key", "sha256", "bytes"}."""
        return {"key": key, **write_chunks(self._path(key), [bytes(data)])}

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """The content of `key`; raises StoreError when missing or when `sha256` does not match."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: not found in store {self.uri}") from None
        _verify(str(path), hashlib.sha256(data).hexdigest(), sha256)
        return data

    def get_file(self, key: str, local_path: str | Path, sha256: str | None = None) -> Path:
        """Copy `key` to `local_path` (atomically, verified against `sha256` when given)."""
        src, dest = self._path(key), Path(local_path)
        if not src.is_file():
            raise StoreError(f"{src}: not found in store {self.uri}")
        h = hashlib.sha256()

        def chunks():
            with src.open("rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    yield chunk
            # Checked before the rename inside write_chunks, so a bad copy never lands.
            _verify(str(src), h.hexdigest(), sha256)

        write_chunks(dest, chunks())
        return dest

    def digest(self, key: str) -> tuple[str, int]:
        """(sha256, bytes) of a stored object, streamed."""
        path = self._path(key)
        if not path.is_file():
            raise StoreError(f"{path}: not found in store {self.uri}")
        return file_sha256(path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (temporary files excluded)."""
        if not self.root.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in files:
                if is_temp_name(name):
                    continue
                key = (rel_dir / name).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"


class S3Store:
    """`s3://bucket/prefix` through boto3; keys are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None):
        """Args: bucket: bucket name; prefix: key prefix ("" or "a/b"); client: a boto3 S3 client
        (built from the standard AWS environment/config when None)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("s3")
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _error(self, e: Exception, where: str) -> StoreError:
        """A boto error as a StoreError that says what to fix (never echoing credentials)."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", "?")
        if isinstance(e, NoCredentialsError):
            return StoreError(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                              "or AWS_PROFILE, or pass a client built from a Prefect AwsCredentials block")
        if isinstance(e, EndpointConnectionError):
            return StoreError(f"{where}: cannot reach the S3 endpoint {endpoint} (check AWS_ENDPOINT_URL)")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and where == f"s3://{self.bucket}"):
                return StoreError(f"s3://{self.bucket}: bucket does not exist at {endpoint}; create it "
                                  f"(aws s3 mb s3://{self.bucket}) or fix the `store` setting")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StoreError(f"{where}: not found in store {self.uri}")
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(f"{where}: access denied ({code}); check the AWS credentials and bucket policy")
            return StoreError(f"{where}: S3 error {code}: {e.response.get('Error', {}).get('Message', '')}")
        return StoreError(f"{where}: {type(e).__name__}: {e}")

    def check(self) -> "S3Store":
        """Fail early (before any paid work) when the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._error(e, f"s3://{self.bucket}") from None
        return self

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, self.url(key)) from None
        except Exception as e:
            raise self._error(e, self.url(key)) from None

    def _promote(self, tmp_key: str, key: str, sha: str) -> None:
        """Copy the fully uploaded temporary object to its final key, then drop the temporary one.

        S3 has no rename; the server-side copy means the final key only ever holds a
        complete object, and a crash mid-upload leaves at most a `.tmp` key that
        `list` ignores. The managed copy handles objects over 5 GB (multipart copy).
        """
        final = self._key(key)
        try:
            self.client.copy({"Bucket": self.bucket, "Key": tmp_key}, self.bucket, final,
                             ExtraArgs={"Metadata": {"sha256": sha}, "MetadataDirective": "REPLACE"})
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=tmp_key)
            except Exception:
                pass  # a leftover .tmp key is harmless: never listed, never read

    def _tmp_key(self, key: str) -> str:
        p = PurePosixPath(self._key(key))
        return str(p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp"))

    def put_file(self, local_path: str | Path, key: str) -> dict[str, Any]:
        """Upload a file to `key` atomically. Returns {"key", "sha256", "bytes"}."""
        src = Path(local_path)
        if not src.is_file():
            raise StoreError(f"{src}: file not found (publishing {key})")
        sha, size = file_sha256(src)
        tmp_key = self._tmp_key(key)
        try:
            self.client.upload_file(str(src), self.bucket, tmp_key, ExtraArgs={"Metadata": {"sha256": sha}})
            self._promote(tmp_key, key, sha)
        except StoreError:
            raise
        except Exception as e:
            raise self._error(e, self.url(key)) from None
        return {"key": key, "sha256": sha, "bytes": size}

    def put_bytes(self, data: bytes, key: str) -> dict[str, Any]:
        """Write bytes to `key` atomically. Returns {"key", "sha256", "bytes"}."""
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        tmp_key = self._tmp_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=data, Metadata={"sha256": sha})
            self._promote(tmp_key, key, sha)
        except Exception as e:
            raise self._error(e, self.url(key)) from None
        return {"key": key, "sha256": sha, "bytes": len(data)}

    def _get(self, key: str) -> dict[str, Any]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._error(e, self.url(key)) from None

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """The content of `key`; raises StoreError when missing or when the sha256 (given, or recorded
        on the object at upload) does not match."""
        obj = self._get(key)
        data = obj["Body"].read()
        actual = hashlib.sha256(data).hexdigest()
        _verify(self.url(key), actual, sha256)
        _verify(self.url(key), actual, obj.get("Metadata", {}).get("sha256"))
        return data

    def get_file(self, key: str, local_path: str | Path, sha256: str | None = None) -> Path:
        """Download `key` to `local_path` (atomically, verified against `sha256` when given)."""
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, self._key(key), tmp)
            except Exception as e:
                raise self._error(e, self.url(key)) from None
            _verify(self.url(key), file_sha256(tmp)[0], sha256)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def digest(self, key: str) -> tuple[str, int]:
        """(sha256, bytes) of a stored object, streamed."""
        obj = self._get(key)
        h, size = hashlib.sha256(), 0
        for chunk in obj["Body"].iter_chunks(CHUNK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._error(e, self.url(key)) from None

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (temporary keys excluded)."""
        keys = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix):]
                    if not is_temp_name(PurePosixPath(key).name):
                        keys.append(key)
        except Exception as e:
            raise self._error(e, self.uri) from None
        return sorted(keys)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"


def open_store(uri: str, client: Any = None) -> LocalStore | S3Store:
    """The store at `uri`: a directory path, or s3://bucket[/prefix].

    Args:
        uri: the `store` config value.
        client: optional boto3 S3 client for s3:// (e.g. from a Prefect AwsCredentials block).
    An s3:// store checks its bucket right away, so a missing bucket fails before any work.
    """
    uri = str(uri).strip()
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{uri}: expected s3://bucket/prefix")
        return S3Store(bucket, prefix, client=client).check()
    if "://" in uri:
        raise StoreError(f"{uri}: unsupported store; use a directory or s3://bucket/prefix")
    return LocalStore(uri)


def list_runs(store: LocalStore | S3Store) -> list[str]:
    """Ids of the complete runs in the store (those with a manifest.json), sorted."""
    return sorted(k.split("/")[0] for k in store.list() if k.count("/") == 1 and k.endswith("/manifest.json"))


def _same_dir(store: LocalStore | S3Store, run_id: str, local_run_dir: Path) -> bool:
    if not isinstance(store, LocalStore):
        return False
    return (store.root / run_id).resolve() == local_run_dir.resolve()


def publish_run(local_run_dir: str | Path, store: LocalStore | S3Store, run_id: str, manifest: dict) -> dict:
    """Upload a finished run and its manifest; manifest.json goes last and marks the run complete.

    Args:
        local_run_dir: the folder the run was assembled in.
        store: the destination (`open_store(config.store)`).
        run_id: the run's folder name in the store.
        manifest: from `distill.manifest.build_manifest`; gets "artifacts", "store" and "store_uri".
    Returns the final manifest, also written to `local_run_dir/manifest.json`.
    """
    local = Path(local_run_dir)
    if not local.is_dir():
        raise StoreError(f"{local}: run directory not found")
    _check_key(run_id)
    manifest_key = f"{run_id}/manifest.json"
    in_place = _same_dir(store, run_id, local)
    if store.exists(manifest_key):
        # Re-publishing over a finished run: unmark it first, so readers never see a
        # complete-looking run whose files are being replaced underneath.
        store.delete(manifest_key)
    artifacts: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel == "manifest.json" or any(is_temp_name(part) for part in path.relative_to(local).parts):
            continue
        put = store.put_file(path, f"{run_id}/{rel}")
        artifacts[rel] = {"sha256": put["sha256"], "bytes": put["bytes"], "uri": store.url(put["key"])}
    final = {**manifest, "run_id": run_id, "artifacts": artifacts, "store": store.uri,
             "store_uri": store.url(run_id)}
    blob = (json.dumps(final, indent=1, sort_keys=False, default=str) + "\n").encode()
    if not in_place:
        store.put_bytes(blob, manifest_key)
    write_text(local / "manifest.json", blob.decode())
    return final


def read_manifest(store: LocalStore | S3Store, run_id: str, verify: bool = False) -> dict:
    """The manifest of a complete run.

    Args:
        store: where the run lives.
        run_id: the run's folder name.
        verify: also check every artifact's sha256 (raises StoreError listing the problems).
    """
    key = f"{_check_key(run_id)}/manifest.json"
    if not store.exists(key):
        raise StoreError(f"run {run_id!r}: no manifest.json at {store.url(key)} "
                         "(unknown run id, or a run that did not finish)")
    try:
        manifest = json.loads(store.get_bytes(key))
    except json.JSONDecodeError as e:
        raise StoreError(f"{store.url(key)}:{e.lineno}: invalid JSON ({e.msg})") from None
    if verify:
        problems = verify_run(store, run_id)
        if problems:
            raise StoreError(f"run {run_id!r} failed verification:\n  " + "\n  ".join(problems))
    return manifest


def verify_run(store: LocalStore | S3Store, run_id: str) -> list[str]:
    """Problems with a stored run (missing manifest or artifacts, size or sha256 mismatches); [] when sound."""
    try:
        manifest = read_manifest(store, run_id)
    except StoreError as e:
        return [str(e)]
    problems = []
    for rel, art in sorted((manifest.get("artifacts") or {}).items()):
        key = f"{run_id}/{rel}"
        if not store.exists(key):
            problems.append(f"{rel}: missing from {store.url(key)}")
            continue
        sha, size = store.digest(key)
        if sha != art.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (manifest {art.get('sha256')}, stored {sha})")
        elif size != art.get("bytes"):
            problems.append(f"{rel}: size mismatch (manifest {art.get('bytes')}, stored {size})")
    return problems
