"""Checkpoints on Google Cloud Storage, against the real google-cloud-storage client and gcp-storage-emulator.

The emulator runs in a subprocess on a free loopback port; the only thing the tests change is the server
address (STORAGE_EMULATOR_HOST). Skipped, with the reason, when the emulator is not installed or cannot start.
"""

import functools
import io
import os
import socket
import subprocess
import sys
import time
import uuid

import gin
import pytest
import torch

from colm.checkpoints.common import transform_file
from colm.formats.checkpoint_io import read_checkpoint, read_experiment, write_checkpoint, write_experiment
from colm.formats.gcs import GcsNotFoundError
from colm.moma.lora import modify_with_lora
from colm.moma.weights import load_weights, save_weights, upload_to_gcs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = functools.partial(modify_with_lora, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
                         lora_layers="q|k|v|o|w.*")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """`http://127.0.0.1:<port>` of a gcp-storage-emulator (in memory) running for this module."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed "
                                                       "(pip install -r requirements-dev.txt)")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.skip(f"gcp-storage-emulator did not start on 127.0.0.1:{port}: {err.strip()[-500:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def bucket(emulator, monkeypatch, tmp_path):
    """A fresh bucket on the emulator, made with the real client; the test runs in tmp_path."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    monkeypatch.chdir(tmp_path)
    name = f"colm-test-{uuid.uuid4().hex[:12]}"
    storage.Client(project="colm-test", credentials=AnonymousCredentials()).create_bucket(name)
    return name


def _blob(bucket, name):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="colm-test", credentials=AnonymousCredentials()).bucket(bucket).blob(name)


def _trained_lora_model(make_model):
    model = make_model([LORA], trainable_params="expert")
    for _, param in model.named_trainable_parameters():
        param.data.normal_()
    return model


def test_upload_by_save_weights_then_load_from_gs(make_model, bucket, capsys):
    model = _trained_lora_model(make_model)
    gin.bind_parameter("upload_to_gcs.bucket", bucket)
    gin.bind_parameter("upload_to_gcs.prefix", "runs/")
    local = save_weights(model, weight_path="exp_out/lora_run/best.pt", save_params=".*expert.*",
                         should_save_to_gcp=True)
    assert f"uploaded exp_out/lora_run/best.pt to gs://{bucket}/runs/exp_out/lora_run/best.pt" in capsys.readouterr().out
    with open(local, "rb") as f:
        assert _blob(bucket, "runs/exp_out/lora_run/best.pt").download_as_bytes() == f.read()

    saved = read_checkpoint(local)
    other = make_model([LORA])
    load_weights(other, weight_path=f"gs://{bucket}/runs/exp_out/lora_run/best.pt")
    own = other.torch_model.state_dict()
    assert saved and all(torch.equal(own[key], value) for key, value in saved.items())
    assert other.loaded_from == [f"gs://{bucket}/runs/exp_out/lora_run/best.pt"]


def test_write_to_gs_then_read_back(bucket):
    torch.manual_seed(0)
    state = {"encoder.block.0.layer.0.SelfAttention.q.expert_lora_a": torch.randn(4, 16),
             "steps": torch.arange(5),
             "large": torch.randn(2_500_000)}  # 10 MB: above 8 MB the client uploads in resumable chunks
    for name in ("ckpt/weights.pt", "ckpt/weights.safetensors"):
        write_checkpoint(state, f"gs://{bucket}/{name}")
        back = read_checkpoint(f"gs://{bucket}/{name}")
        assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    assert _blob(bucket, "ckpt/weights.safetensors").download_as_bytes()[8:9] == b"{"  # a safetensors header

    # Experiment paths (the checkpoint scripts): gs://bucket/prefix/<exp> is <exp>/best.pt.
    assert write_experiment(state, f"gs://{bucket}/library/expert_a") == f"gs://{bucket}/library/expert_a/best.pt"
    out = transform_file("double", lambda s: {k: v * 2 for k, v in s.items()},
                         f"gs://{bucket}/library/expert_a", f"gs://{bucket}/library/expert_a_doubled")
    assert out == f"gs://{bucket}/library/expert_a_doubled/best.pt"
    doubled = read_experiment(f"gs://{bucket}/library/expert_a_doubled")
    assert all(torch.equal(doubled[k], v * 2) for k, v in state.items())
    assert not os.path.exists("exp_out")  # nothing was written locally


def test_save_weights_to_gs_numbered_and_load_latest(make_model, bucket):
    model = _trained_lora_model(make_model)
    path = f"gs://{bucket}/runs/weights.pt"
    assert save_weights(model, weight_path=path, add_index=True, save_params=".*expert.*") == \
        f"gs://{bucket}/runs/weights.0.pt"
    for _, param in model.named_trainable_parameters():
        param.data.add_(1.0)
    assert save_weights(model, weight_path=path, add_index=True, save_params=".*expert.*") == \
        f"gs://{bucket}/runs/weights.1.pt"
    other = make_model([LORA])
    load_weights(other, weight_path=path, scan_numbers=True)
    assert other.loaded_from == [f"gs://{bucket}/runs/weights.1.pt"]
    own, trained = other.torch_model.state_dict(), model.torch_model.state_dict()
    assert all(torch.equal(own[k], trained[k]) for k in read_checkpoint(f"gs://{bucket}/runs/weights.1.pt"))


def test_missing_object_and_bucket_are_named(make_model, bucket, capsys):
    with pytest.raises(GcsNotFoundError, match=f"bucket '{bucket}' has no object 'nothing/here/best.pt'"):
        read_checkpoint(f"gs://{bucket}/nothing/here/best.pt")
    with pytest.raises(FileNotFoundError, match="bucket 'colm-no-such-bucket' does not exist"):
        read_experiment("gs://colm-no-such-bucket/library/expert_a")
    with pytest.raises(GcsNotFoundError, match="gs://colm-no-such-bucket/x/best.pt.*'colm-no-such-bucket' does not"):
        write_checkpoint({"a": torch.zeros(1)}, "gs://colm-no-such-bucket/x/best.pt")

    # The upload option reports a failed upload, keeps the local file and lets the run go on.
    with open("local.pt", "wb") as f:
        torch.save({"a": torch.zeros(1)}, f)
    assert upload_to_gcs("local.pt", bucket="colm-no-such-bucket") is None
    out = capsys.readouterr().out
    assert "WARNING: upload of local.pt failed" in out and "bucket 'colm-no-such-bucket' does not exist" in out
    with pytest.raises(ValueError, match="bucket name alone"):
        upload_to_gcs("local.pt", bucket=f"gs://{bucket}")

    model = make_model([LORA])
    load_weights(model, weight_path=f"gs://{bucket}/absent.pt", skip_if_not_found=True)
    assert "absent.pt not found, skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="names no bucket"):
        read_checkpoint("gs:///x.pt")


def test_corrupt_object_is_named_by_its_gs_path(bucket):
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(100)}, buffer)
    _blob(bucket, "broken/best.pt").upload_from_string(buffer.getvalue()[:300])  # a truncated copy
    with pytest.raises(RuntimeError, match=f"Could not read checkpoint gs://{bucket}/broken/best.pt \\(300 bytes\\)"):
        read_checkpoint(f"gs://{bucket}/broken/best.pt")


@pytest.mark.slow
def test_no_credentials_is_one_clear_error(tmp_path):
    """Without credentials (and no emulator) a read fails with what to do, not a traceback from the client."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
    env.update(NO_GCE_CHECK="true", CLOUDSDK_CONFIG=str(tmp_path), HOME=str(tmp_path), PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", "from colm.formats.checkpoint_io import read_checkpoint\n"
                               "read_checkpoint('gs://some-bucket/runs/best.pt')"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Cannot download gs://some-bucket/runs/best.pt: no Google Cloud credentials found" in result.stderr
    assert "gcloud auth application-default login" in result.stderr
    assert "site-packages/google" not in result.stderr, result.stderr


def test_concatenation_and_library_read_experts_from_gs(bucket):
    """Experts kept in a bucket are concatenated from there, and a library in a bucket is read from there."""
    from colm.checkpoints.concatenate import run_concatenate
    from colm.formats import keys as K
    from colm.formats.expert_library import read_metadata

    experts = {}
    for i, name in enumerate(("ToySentiment", "ToyTopic")):
        g = torch.Generator().manual_seed(i)
        experts[name] = {K.layer1_key("encoder.block.0.layer.0.SelfAttention.q", 0): torch.randn(8, 2, generator=g),
                         K.layer2_key("encoder.block.0.layer.0.SelfAttention.q", 0): torch.randn(2, 8, generator=g),
                         K.router_key("encoder.block.0.layer.0.SelfAttention.q", 0): torch.randn(8, generator=g)}
        write_checkpoint(experts[name], f"gs://{bucket}/experts/{name}_lora/best.pt")
    out = run_concatenate(datasets=["ToySentiment", "ToyTopic"], suffix="lora", expert_dir=f"gs://{bucket}/experts",
                          out_path="FromBucket")
    both = read_checkpoint(out)
    for i, name in enumerate(experts):
        for key, value in experts[name].items():
            assert torch.equal(both[key.replace("__0", f"__{i}")], value)
    with pytest.raises(FileNotFoundError, match="expert checkpoints missing"):
        run_concatenate(datasets=["ToySentiment", "ToyQa"], suffix="lora", expert_dir=f"gs://{bucket}/experts",
                        out_path="Missing")

    _blob(bucket, "library/ToyTopic/expert.json").upload_from_string('{"name": "ToyTopic"}')
    with pytest.raises(ValueError, match="lacks the field"):
        read_metadata(f"gs://{bucket}/library/ToyTopic")  # found and read from the bucket, then checked
    with pytest.raises(FileNotFoundError, match="no expert library entry"):
        read_metadata(f"gs://{bucket}/library/ToyQa")
