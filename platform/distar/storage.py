"""S3, and S3-compatible stores such as MinIO, for sources and checkpoints, through boto3.

An s3:// source names one object (a prompt file) or a prefix (a model folder: every object under
it). It is downloaded once per node into DISTAR_CACHE/s3, into a folder named by the objects' keys,
ETags and sizes: a changed object is fetched again, an unchanged one never. The processes of a
node share the cache: one downloads under a file lock into a side folder renamed into place when
complete, the others wait for it and read the result.

The endpoint and credentials are boto3's own settings: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3,
or `endpoint_url` in the profile) for MinIO and other S3-compatible servers; credentials from the
environment, AWS_PROFILE, or the node's instance role. distar never reads, logs or records them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distar.errors import UserError

SCHEME = "s3://"
Keep = Callable[[list[str]], Iterable[str]]  # a folder's file names -> those to download


class StorageError(UserError):
    """An s3:// location that cannot be used; str() is the message to print."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    etag: str
    size: int
    name: str  # path relative to the source: a file's own name, or its place in a folder


def is_s3(location: str | None) -> bool:
    return bool(location) and location.startswith(SCHEME)


def cache_dir() -> Path:
    """Where this machine keeps built and downloaded sources (tiny-random models, s3:// objects)."""
    return Path(os.environ.get("DISTAR_CACHE", Path.home() / ".cache" / "distar"))


def split(uri: str, field: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix(SCHEME).partition("/")
    if not bucket:
        raise StorageError(f"{field}: {uri}: names no bucket (expected s3://BUCKET/KEY)")
    return bucket, key


def client():
    import boto3
    from botocore.config import Config

    # A session of its own reads the environment now (boto3's default session keeps the first
    # credentials it found). Standard mode retries throttling, 5xx and dropped connections with
    # backoff, 5 tries in all.
    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120))


def objects(uri: str, field: str, keep: Keep | None = None) -> list[StoredObject]:
    """What `uri` names: the one object at that key, else every object under it as a folder (with
    `keep`, only those of its names, relative to the folder, that `keep` returns)."""
    from botocore.exceptions import ClientError

    bucket, key = split(uri, field)
    s3 = client()
    with _explained(uri, field):
        if key and not key.endswith("/"):
            try:
                head = s3.head_object(Bucket=bucket, Key=key)
                return [StoredObject(key, head["ETag"], head["ContentLength"], PurePosixPath(key).name)]
            except ClientError as e:
                if _code(e) == "403":  # a HEAD answer has no body to say why: a listing's error does
                    s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
                if _code(e) not in ("404", "NoSuchKey"):
                    raise
        prefix = f"{key.rstrip('/')}/" if key else ""
        found = [StoredObject(o["Key"], o["ETag"], o["Size"], o["Key"][len(prefix):])
                 for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                 for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not found:
        raise StorageError(f"{field}: {uri}: no such object, and no objects under it as a folder, in bucket {bucket!r}")
    for o in found:
        _stays_inside(o, bucket, field)
    if keep is not None:
        kept = set(keep([o.name for o in found]))
        if not kept:
            raise StorageError(f"{field}: {uri}: none of the {len(found)} objects under it is a file this model loads (e.g. {found[0].name})")
        found = [o for o in found if o.name in kept]
    return found


def _stays_inside(o: StoredObject, bucket: str, field: str) -> None:
    """A key names its file in the cache folder by its name under the prefix: refuse one that
    would land outside the folder (anyone who can write the bucket could otherwise write any file
    the driver, trainers and replicas can)."""
    name = PurePosixPath(o.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise StorageError(f"{field}: s3://{bucket}/{o.key}: refusing this key: its name under the prefix ({o.name!r}) "
                           "is absolute or climbs with '..', so its file would land outside the download folder")


def fetch(uri: str, field: str, cache: Path | None = None, keep: Keep | None = None) -> Path:
    """The local copy of `uri`: a file for an object, a folder for a prefix (of the objects `keep`
    selects, if given: a model folder's loader reads a few of the files published beside it)."""
    listed = objects(uri, field, keep)
    bucket, key = split(uri, field)
    digest = hashlib.sha256("\n".join(f"{o.key} {o.etag} {o.size}" for o in listed).encode()).hexdigest()[:16]
    folder = (cache or cache_dir()) / "s3" / bucket / f"{PurePosixPath(key.rstrip('/')).name or bucket}-{digest}"
    single = len(listed) == 1 and listed[0].key == key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait here, then find the folder
        if not folder.is_dir():
            _download(bucket, listed, folder, uri, field)
    return folder / listed[0].name if single else folder


def _download(bucket: str, listed: list[StoredObject], folder: Path, uri: str, field: str) -> None:
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    s3 = client()
    try:
        with _explained(uri, field):
            for o in listed:
                target = partial / o.name
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, o.key, str(target))
                if target.stat().st_size != o.size:
                    raise StorageError(f"{field}: s3://{bucket}/{o.key}: got {target.stat().st_size} bytes of {o.size}")
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def checkpoint_location(location: str):
    """(storage_path, filesystem) for Ray Train: a local folder as it is, an s3:// URI as a pyarrow
    filesystem on the endpoint and region boto3 resolves here. The filesystem carries no
    credentials; each node finds its own through the same chain."""
    if not is_s3(location):
        return location, None
    import pyarrow.fs

    split(location, "run.storage_path")
    s3 = client()
    endpoint = s3.meta.endpoint_url
    custom = not endpoint.rstrip("/").endswith(".amazonaws.com")
    fs = pyarrow.fs.S3FileSystem(region=s3.meta.region_name, **({"endpoint_override": endpoint} if custom else {}))
    return location.removeprefix(SCHEME).rstrip("/"), fs


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@contextmanager
def _explained(uri: str, field: str):
    """Turns boto3's failures into one line naming the location and what to check."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = f"{field}: {uri}"
    try:
        yield
    except NoCredentialsError:
        raise StorageError(f"{where}: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "or give the node an instance role)") from None
    except ClientError as e:
        code = _code(e)
        if code == "NoSuchBucket":
            raise StorageError(f"{where}: bucket {split(uri, field)[0]!r} does not exist") from None
        if code in ("404", "NoSuchKey"):
            raise StorageError(f"{where}: no such object") from None
        if code in ("403", "AccessDenied", "AllAccessDisabled"):
            raise StorageError(f"{where}: access denied; the credentials in use may not read this bucket or key") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            raise StorageError(f"{where}: the store refused the credentials in use ({code})") from None
        raise StorageError(f"{where}: {code or type(e).__name__}: {e.response.get('Error', {}).get('Message', '')}") from None
    except BotoCoreError as e:  # unreachable endpoint (after the retries), bad region, ...
        raise StorageError(f"{where}: {type(e).__name__}: {e}") from None
