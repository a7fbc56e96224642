"""Where run folders, data and outputs live: a local path or a `gs://bucket/...` URI, one interface.

Remote paths are `etils.epath.Path` objects (epath talks to GCS through gcsfs: the `gcs` extra);
orbax and tensorstore read and write `gs://` checkpoints themselves. Local paths stay
`pathlib.Path`. What differs between the two is kept here:

  - atomic writes (`write_text`, `write_bytes`): a temporary name then `os.replace` on disk; on
    GCS one object upload, which readers see whole or not at all (the object store's equivalent);
  - appends (`append_line`, metrics.jsonl): GCS objects cannot be appended to, so the object is
    read once per process and rewritten whole on each append (atomic, and the file stays small:
    one line per log step);
  - array_record files, which array_record's C++ reader and writer open as local files only:
    datasets in a bucket are built on local disk and uploaded (`publish`), and read from a local
    copy kept under the cache (`local_copy`), refreshed when the bucket's copy changes.

The GCS emulator (`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`, as gcsfs and the Google client
read it) is passed on to tensorstore (`TENSORSTORE_GCS_HTTP_URL`), so one variable points every
library at it; the tests run fake-gcs-server that way.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

REMOTE_SCHEMES = ("gs://",)
_EMULATOR = "STORAGE_EMULATOR_HOST"


def _configure_gcs() -> None:
    """Before gcsfs is first used.

    gcsfs keeps no listings cache here: orbax writes through tensorstore, other processes write
    the same run, and a cached listing of a checkpoints folder would hide their steps.
    With STORAGE_EMULATOR_HOST set, tensorstore (orbax's arrays) is pointed at it through its own
    variable, and gcsfs' probe of a bucket's type, which goes through a gRPC API that emulators
    do not serve (a minute of retries per bucket), is switched off."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
    if os.environ.get(_EMULATOR):
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", os.environ[_EMULATOR])
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class StorageError(OSError):
    """A remote path that cannot be used: no gcsfs, no such bucket. The message is one line."""


def is_remote(path: Any) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def path(value: Any):
    """A `pathlib.Path` for a local path, an `epath.Path` for `gs://...` (`value` may be either)."""
    if not is_remote(value):
        return pathlib.Path(value)
    _filesystem(value)  # configured, and gcsfs installed
    from etils import epath

    return epath.Path(str(value))


def absolute(value: Any):
    """`path(value)`, made absolute when local (a bucket URI is absolute already)."""
    p = path(value)
    return p if is_remote(p) else p.absolute()


def bucket_of(value: Any) -> str:
    """The bucket of a gs:// URI (`gs://bucket/a/b` -> `bucket`)."""
    return str(value).split("://", 1)[1].split("/", 1)[0]


def check_bucket(value: Any) -> None:
    """Raise StorageError naming the bucket when a gs:// path's bucket does not exist (or cannot
    be seen with the credentials at hand); local paths pass."""
    if not is_remote(value):
        return
    bucket = bucket_of(value)
    fs = _filesystem(value)
    try:
        exists = fs.exists(bucket)
    except Exception as err:  # credentials, network: one line, naming the bucket
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        raise StorageError(f"{value}: cannot reach bucket gs://{bucket} ({why})") from None
    if not exists:
        raise StorageError(f"{value}: bucket gs://{bucket} does not exist (create it first, e.g. "
                           f"`gcloud storage buckets create gs://{bucket}`)")  # fmt: skip


def _filesystem(value: Any = ""):
    """gcsfs' filesystem object, the instance epath uses (configured by `_configure_gcs` before
    it is first made). `value` names the path in the error when gcsfs is missing."""
    _configure_gcs()
    try:
        import fsspec
        import gcsfs  # noqa: F401  (epath's backend for gs:// without TensorFlow)
    except ImportError:
        need = "gs:// paths need gcsfs (pip install 'unclip-jax[gcs]')"
        raise StorageError(f"{value}: {need}" if value else need) from None
    return fsspec.filesystem("gcs", finalize_on_close=True)


def size(p) -> int:
    """Bytes of a file (local or remote)."""
    stat = p.stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length


def mkdir(p) -> None:
    """Create a folder and its parents (on GCS folders are name prefixes: nothing to create)."""
    if not is_remote(p):
        pathlib.Path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p, data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new, never a part."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)  # one object upload: visible only once complete
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def read_json(p) -> Any:
    return json.loads(path(p).read_text())


_appended: dict[str, str] = {}  # remote file -> its content, as this process last wrote it


def append_line(p, line: str) -> None:
    """Append one line (no newline in it) to a text file, creating it.

    Local: an O_APPEND write. Remote: the object is read once per process (a resumed run keeps
    its history) and rewritten whole, atomically, on each call. Only one process may append to a
    given remote file (process 0 writes the metrics)."""
    p = path(p)
    if not is_remote(p):
        with p.open("a") as f:
            f.write(line + "\n")
        return
    key = str(p)
    if key not in _appended:
        _appended[key] = p.read_text() if p.exists() else ""
    _appended[key] += line + "\n"
    p.write_text(_appended[key])


def replace(src, dst) -> None:
    """Move a file or folder to a new name (on GCS a copy then delete, object by object)."""
    if is_remote(src) or is_remote(dst):
        _filesystem(src).mv(str(src), str(dst), recursive=True)
        return
    os.replace(src, dst)


# ---------------------------------------------------------------------------------------- folders
def cache_root() -> pathlib.Path:
    """Local copies of remote folders: $UNCLIP_JAX_CACHE, else ~/.cache/unclip_jax."""
    root = os.environ.get("UNCLIP_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unclip_jax"
    )
    return pathlib.Path(root)


def local_mirror(remote) -> pathlib.Path:
    """Where `local_copy` keeps a remote folder: <cache>/gcs/<bucket>/<path>."""
    return cache_root() / "gcs" / str(remote).split("://", 1)[1].rstrip("/")


def _record(local: pathlib.Path) -> pathlib.Path:
    """The listing (name -> [size, generation]) that a local mirror was last brought up to."""
    return local.with_name(local.name + ".listing.json")


def _listing(remote) -> dict[str, tuple[int, str]]:
    """{relative name: (size, generation or etag)} of every object under a remote folder."""
    fs = _filesystem(remote)
    base = str(remote).split("://", 1)[1].rstrip("/")
    found = fs.find(base, detail=True)
    return {
        name[len(base) + 1 :]: (int(info.get("size", 0)),
                                str(info.get("generation") or info.get("etag") or ""))
        for name, info in found.items()
        if info.get("type") != "directory" and name.startswith(base + "/")
    }  # fmt: skip


def file_sizes(folder) -> dict[str, int]:
    """{relative name: bytes} of every file under a folder (remote: one listing, no stats)."""
    if is_remote(folder):
        return {name: entry[0] for name, entry in _listing(folder).items()}
    folder = pathlib.Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def local_copy(remote) -> pathlib.Path:
    """A local folder with the content of `remote` (returned as it is when local).

    The copy sits under `local_mirror(remote)` and is refreshed object by object when the
    bucket's listing (sizes, generations) differs from the one recorded beside it; a copy
    interrupted midway is completed on the next call. Raises FileNotFoundError naming the
    remote folder when nothing is there."""
    if not is_remote(remote):
        return pathlib.Path(remote)
    fs = _filesystem(remote)
    if fs.isfile(str(remote)):  # one object: a table, a tar shard
        info = fs.info(str(remote))
        target = local_mirror(remote)
        stamp = target.with_name(target.name + ".generation")
        generation = f"{info.get('size')}:{info.get('generation') or info.get('etag')}"
        if not (target.is_file() and stamp.is_file() and stamp.read_text() == generation):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part{os.getpid()}")
            fs.get_file(str(remote), str(tmp))
            os.replace(tmp, target)
            write_text(stamp, generation)
        return target
    local = pull(remote)
    if not any(local.iterdir()):
        raise FileNotFoundError(f"nothing at {remote}")
    return local


def pull(remote) -> pathlib.Path:
    """`local_mirror(remote)` brought up to date with the bucket (created empty when nothing is
    there yet: a folder that a process is about to write)."""
    check_bucket(remote)
    listing = _listing(remote)
    local = local_mirror(remote)
    local.mkdir(parents=True, exist_ok=True)
    try:
        have = json.loads(_record(local).read_text())
    except (OSError, ValueError):
        have = {}
    want = {name: list(entry) for name, entry in listing.items()}
    if have == want and all((local / name).is_file() for name in want):
        return local
    fs = _filesystem(remote)
    base = str(remote).rstrip("/")
    for name, (nbytes, generation) in listing.items():
        target = local / name
        if have.get(name) == [nbytes, generation] and target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        fs.get_file(f"{base}/{name}", str(tmp))
        os.replace(tmp, target)
    for stale in set(have) - set(want):
        (local / stale).unlink(missing_ok=True)
    write_text(_record(local), json.dumps(want))
    return local


def push(local_file, local_root, remote_root) -> None:
    """Upload one file of a local mirror to the same relative name under `remote_root` (a no-op
    when `remote_root` is None: the folder is local)."""
    if remote_root is None:
        return
    name = pathlib.Path(local_file).relative_to(local_root).as_posix()
    _filesystem(remote_root).put_file(str(local_file), f"{str(remote_root).rstrip('/')}/{name}")


def publish(local: pathlib.Path, remote, *, last: tuple[str, ...] = ()) -> None:
    """Upload a local folder's files to a remote folder; the names in `last` go up after all
    the others, so that a reader that waits for them (tfds' dataset_info.json) sees the whole
    folder or nothing."""
    fs = _filesystem(remote)
    base = str(remote).rstrip("/")
    files = sorted(p for p in pathlib.Path(local).rglob("*") if p.is_file())
    ordered = [p for p in files if p.name not in last] + [p for p in files if p.name in last]
    for p in ordered:
        fs.put_file(str(p), f"{base}/{p.relative_to(local).as_posix()}")
    if pathlib.Path(local) == local_mirror(remote):  # the cache's copy is now the bucket's
        listing = {name: list(entry) for name, entry in _listing(remote).items()}
        write_text(_record(pathlib.Path(local)), json.dumps(listing))


def write_folder(folder, write) -> None:
    """`write(local_dir)` fills a folder, which appears whole at `folder`: on disk written beside
    under another name and renamed (a folder already there, e.g. left by a failed convert, is
    replaced); in a bucket written to a temporary local folder and uploaded file by file."""
    import tempfile

    if is_remote(folder):
        with tempfile.TemporaryDirectory() as tmp:
            write(pathlib.Path(tmp))
            publish(pathlib.Path(tmp), folder)
        return
    folder = pathlib.Path(folder)
    partial = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    write(partial)
    if folder.is_dir():
        shutil.rmtree(folder)
    os.replace(partial, folder)
