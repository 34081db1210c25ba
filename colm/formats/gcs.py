"""Google Cloud Storage paths (`gs://<bucket>/<object name>`) through the google-cloud-storage client.

checkpoint_io reads and writes checkpoints at gs:// paths with these functions: a read downloads the
object to a temporary local file, a write saves locally and uploads to the final name (a GCS object only
appears once its upload is complete, so a reader never sees half a checkpoint).

Credentials are the client's own: Application Default Credentials (`gcloud auth application-default
login`, or GOOGLE_APPLICATION_CREDENTIALS naming a service-account key file). GOOGLE_CLOUD_PROJECT is
passed as the project when set (object reads and writes do not need one). With STORAGE_EMULATOR_HOST set
(e.g. `http://127.0.0.1:9023` for gcp-storage-emulator) the client talks to that server with anonymous
credentials.

Failures raise GcsError (GcsNotFoundError, also a FileNotFoundError, for a missing bucket or object) with
the bucket and object named and what to do; the client's own traceback is not chained.
"""

import contextlib
import functools
import os
import tempfile

SCHEME = "gs://"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "colm-emulator"  # the emulator accepts any project; the client wants one to create buckets


class GcsError(RuntimeError):
    """A GCS operation failed; the message names the bucket and object and what to do."""


class GcsNotFoundError(GcsError, FileNotFoundError):
    """The bucket or the object does not exist."""


def is_gcs_path(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def split(path: str, need_object: bool = True) -> tuple:
    """`gs://bucket/a/b.pt` -> ("bucket", "a/b.pt"). Refuses a path without a bucket (or without an object
    name when need_object)."""
    if not is_gcs_path(path):
        raise ValueError(f"{path!r} is not a GCS path (gs://<bucket>/<object name>).")
    bucket, _, name = path[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{path!r} names no bucket: write gs://<bucket>/<object name>.")
    if need_object and not name:
        raise ValueError(f"{path!r} names a bucket but no object: write gs://{bucket}/<object name>.")
    return bucket, name


def join(path: str, *parts: str) -> str:
    """`gs://b/exp`, "best.pt" -> `gs://b/exp/best.pt` (no doubled slashes)."""
    return "/".join([path.rstrip("/"), *(part.strip("/") for part in parts)])


@functools.lru_cache(maxsize=None)
def _client(emulator_host, project):
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or EMULATOR_PROJECT, credentials=AnonymousCredentials())
    # project=None: no project is looked up (object reads and writes need none).
    return storage.Client(project=project)


def client():
    """The storage.Client for the current environment (one per STORAGE_EMULATOR_HOST / project)."""
    return _client(os.environ.get(EMULATOR_ENV) or None, os.environ.get("GOOGLE_CLOUD_PROJECT") or None)


def _endpoint() -> str:
    host = os.environ.get(EMULATOR_ENV)
    return f"the emulator at {host} ({EMULATOR_ENV})" if host else "storage.googleapis.com"


def _bucket_exists(bucket: str):
    """True / False, or None when the credentials may not look at the bucket itself."""
    try:
        return client().bucket(bucket).exists()
    except Exception:
        return None


def _not_found_message(action: str, bucket: str, name: str) -> str:
    exists = _bucket_exists(bucket)
    if exists is False:
        return (f"Cannot {action} gs://{bucket}/{name}: bucket {bucket!r} does not exist on {_endpoint()}. "
                "Check the bucket name (and the project it belongs to).")
    if exists and name:
        return (f"Cannot {action} gs://{bucket}/{name}: bucket {bucket!r} has no object {name!r}. Check the "
                f"path (list it with `gcloud storage ls gs://{bucket}/{name.rsplit('/', 1)[0]}`) or write "
                "the checkpoint first.")
    return (f"Cannot {action} gs://{bucket}/{name}: bucket {bucket!r} or object {name!r} does not exist on "
            f"{_endpoint()}. Check the bucket name and the object path.")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _reported(action: str, bucket: str, name: str = ""):
    """Turns the client's exceptions into a GcsError naming the bucket and object and what to do."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    where = f"gs://{bucket}/{name}"
    try:
        yield
    except api.NotFound:
        raise GcsNotFoundError(_not_found_message(action, bucket, name)) from None
    except auth.DefaultCredentialsError as error:
        raise GcsError(
            f"Cannot {action} {where}: no Google Cloud credentials found ({_first_line(error)}). Run `gcloud auth "
            "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
            f"(for a local emulator set {EMULATOR_ENV}=http://127.0.0.1:<port>).") from None
    except auth.RefreshError as error:
        raise GcsError(
            f"Cannot {action} {where}: the Google Cloud credentials were refused or have expired "
            f"({_first_line(error)}). Log in again (`gcloud auth application-default login`) or check "
            "GOOGLE_APPLICATION_CREDENTIALS.") from None
    except (api.Forbidden, api.Unauthorized) as error:
        raise GcsError(
            f"Cannot {action} {where}: permission denied ({_first_line(error)}). The account in use needs "
            "storage.objects.get to read and storage.objects.create to write in bucket "
            f"{bucket!r} (roles/storage.objectViewer / objectCreator); check also that the bucket name is "
            "yours.") from None
    except api.GoogleAPICallError as error:
        raise GcsError(f"Cannot {action} {where}: {_first_line(error)} (from {_endpoint()}).") from None
    except (auth.TransportError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        raise GcsError(
            f"Cannot {action} {where}: could not reach {_endpoint()} ({_first_line(error)}). Check the network, "
            f"or that the emulator named by {EMULATOR_ENV} is running.") from None
    except Exception as error:
        if type(error).__module__.startswith(("google.", "requests", "urllib3")):
            raise GcsError(f"Cannot {action} {where}: {type(error).__name__}: {_first_line(error)}.") from None
        raise


def upload_file(local_path: str, path: str) -> str:
    """Uploads the local file to gs://bucket/name; the object appears only once complete. Returns `path`."""
    bucket, name = split(path)
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"Cannot upload {local_path} to {path}: the local file does not exist.")
    with _reported("upload to", bucket, name):
        client().bucket(bucket).blob(name).upload_from_filename(local_path)
    return path


def read_bytes(path: str) -> bytes:
    bucket, name = split(path)
    with _reported("read", bucket, name):
        return client().bucket(bucket).blob(name).download_as_bytes()


@contextlib.contextmanager
def downloaded(path: str):
    """Downloads gs://bucket/name to a temporary local file (under TMPDIR, keeping the object's file name and
    so its extension), yields its path and deletes it afterwards."""
    bucket, name = split(path)
    with tempfile.TemporaryDirectory(prefix="colm-gcs-") as directory:
        local = os.path.join(directory, os.path.basename(name) or "object")
        with _reported("download", bucket, name):
            client().bucket(bucket).blob(name).download_to_filename(local)
        yield local


def exists(path: str) -> bool:
    """Whether the object exists (False also when the bucket does not)."""
    bucket, name = split(path)
    with _reported("look up", bucket, name):
        return client().bucket(bucket).blob(name).exists()


def list_paths(prefix_path: str) -> list:
    """The gs:// paths of the objects whose names start with the prefix of `prefix_path` (gs://bucket/prefix)."""
    bucket, prefix = split(prefix_path, need_object=False)
    with _reported("list", bucket, prefix):
        return [f"{SCHEME}{bucket}/{blob.name}" for blob in client().list_blobs(bucket, prefix=prefix)]
