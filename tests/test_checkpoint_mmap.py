"""Mapped checkpoint reads (colm/formats/checkpoint_io.py read_checkpoint(mmap=True), in_file_order) and the
loading that uses them (colm/moma/weights.py): same values, pages released behind the walk, fallbacks."""

import sys

import pytest
import torch

from colm.formats.checkpoint_io import MappedCheckpoint, in_file_order, read_checkpoint, write_checkpoint


def _rss_file():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return None


def _random_state(n=24, numel=70_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {f"m{i}.weight": torch.randn(numel + 13 * i, generator=generator) for i in range(n)}


def test_mapped_read_equals_plain_read_and_walks_in_file_order(tmp_path):
    path = str(tmp_path / "best.pt")
    state = _random_state()
    write_checkpoint(state, path)
    mapped = read_checkpoint(path, mmap=True)
    assert isinstance(mapped, MappedCheckpoint) and (sys.platform != "linux" or mapped.span is not None)
    walked = list(in_file_order(mapped))
    assert [k for k, _ in walked] == list(state)  # torch.save writes the records in the dict's order
    for key, value in walked:  # read after the walk released the pages: they come back from the file
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    plain = read_checkpoint(path)
    assert not isinstance(plain, MappedCheckpoint) and plain.keys() == state.keys()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is read from /proc/self/status")
def test_walk_releases_the_pages_behind_it(tmp_path):
    path = str(tmp_path / "big.pt")
    state = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(64)}  # 64 MiB, 1 MiB each
    write_checkpoint(state, path)
    del state
    mapped = read_checkpoint(path, mmap=True)
    before = _rss_file()
    peak = 0
    for i, (key, value) in enumerate(in_file_order(mapped)):
        assert key == f"t{i}" and float(value.sum()) == float(i) * (1 << 18)
        peak = max(peak, _rss_file() - before)
    assert peak < 16 * (1 << 20), f"{peak / (1 << 20):.1f} MiB of the 64 MiB file stayed resident during the walk"
    # Reading everything without the walk keeps it all resident (what the walk avoids).
    held = read_checkpoint(path, mmap=True)
    start = _rss_file()
    assert sum(float(v.sum()) for v in held.values()) > 0
    assert _rss_file() - start > 48 * (1 << 20)


def test_tensors_put_in_after_reading_are_walked_and_kept(tmp_path):
    path = str(tmp_path / "best.pt")
    write_checkpoint(_random_state(n=4), path)
    mapped = read_checkpoint(path, mmap=True)
    mapped["extra"] = torch.ones(50_000)
    mapped["empty"] = torch.zeros(0)
    walked = dict(in_file_order(mapped))
    assert list(walked)[-2:] == ["extra", "empty"]
    assert bool((walked["extra"] == 1).all())


def test_legacy_format_and_safetensors_are_read_whole(tmp_path):
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"a": torch.arange(5.0)}, legacy, _use_new_zipfile_serialization=False)
    state = read_checkpoint(legacy, mmap=True)
    assert not isinstance(state, MappedCheckpoint) and torch.equal(state["a"], torch.arange(5.0))
    safe = str(tmp_path / "expert.safetensors")
    write_checkpoint({"a": torch.arange(5.0)}, safe)
    assert not isinstance(read_checkpoint(safe, mmap=True), MappedCheckpoint)


def test_truncated_file_is_still_refused_with_mmap(tmp_path):
    path = tmp_path / "best.pt"
    write_checkpoint(_random_state(n=4), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        read_checkpoint(str(path), mmap=True)


def test_load_weights_from_a_mapped_checkpoint_equals_load_state_dict(tmp_path):
    from conftest import write_random_moe_checkpoint

    from colm import registry
    from colm.ginparse import parse_gin
    from colm.moma.weights import load_weights

    path = tmp_path / "best.pt"
    write_random_moe_checkpoint(path, n_experts=3)
    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"], ["M/MODEL/Model.device='cpu'"])
    loaded = registry.get_object("M/MODEL")
    load_weights(loaded, weight_path=str(path))
    own = loaded.torch_model.state_dict()
    state = torch.load(str(path), weights_only=True)
    assert state and all(torch.equal(own[k], v) for k, v in state.items())
    expected = torch.stack([state[f"encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.layer1__{i}"]
                            for i in range(3)])
    assert torch.equal(loaded.module("encoder.block.0.layer.0.SelfAttention.q")._addons["expert_lora"].layer1, expected)
