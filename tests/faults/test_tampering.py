"""Tampered inputs that must be refused before they do harm: checkpoints whose files DeepSpeed
unpickles (through symlinks out of the checkpoint), manifests naming ``pipe:`` shards, and shards
whose labels lie outside their manifest's classes (past the class embedding)."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.errors import ConfigError
from dit.latents import ArraySource, LatentStream, Manifest, write_shards
from dit.latents.manifest import ShardLabelError
from dit.train import DS_TAG, train, verify_checkpoint_files
from dit.vae import IdentityCodec
from tests.faults.test_data_and_checkpoints import recipe


class Evil:
    """Unpickling it touches ``marker``: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def checkpoint(digits8, tmp_path_factory):
    """A real 4-step ZeRO-2 checkpoint (DeepSpeed on a one-rank gloo group)."""
    root = tmp_path_factory.mktemp("tamper")
    result = train(recipe(digits8, steps=4, checkpoint_every=0), lambda m, c: None, checkpoint_root=root)
    ckpt = Path(result.checkpoint_dir)
    verify_checkpoint_files(ckpt)
    return ckpt


def poison(path: Path, marker: Path) -> None:
    """Add an :class:`Evil` to the pickled dict at ``path``."""
    state = torch.load(path, weights_only=False)
    state["evil"] = Evil(marker)
    torch.save(state, path)


def resume(digits8, ckpt: Path, tmp_path: Path) -> None:
    train(recipe(digits8, steps=8, checkpoint_every=0), lambda m, c: None, checkpoint_root=tmp_path / "r",
          resume_from=ckpt)


def test_deepspeed_folder_linked_outside_is_refused(checkpoint, digits8, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    outside = tmp_path / "outside"
    shutil.move(ckpt / DS_TAG, outside)  # a copy of the real shards, one of them poisoned
    marker = tmp_path / "pwned"
    poison(outside / "mp_rank_00_model_states.pt", marker)
    (ckpt / DS_TAG).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="deepspeed' resolves to .*outside'.*outside the checkpoint folder"):
        resume(digits8, ckpt, tmp_path)
    assert not marker.exists()


def test_one_shard_linked_outside_is_refused(checkpoint, digits8, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    shard = ckpt / DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    outside = tmp_path / "elsewhere.pt"
    shutil.move(shard, outside)
    marker = tmp_path / "pwned"
    poison(outside, marker)
    shard.symlink_to(outside)
    with pytest.raises(ConfigError, match="optim_states.pt' resolves to .*elsewhere.pt'.*outside the checkpoint folder"):
        resume(digits8, ckpt, tmp_path)
    assert not marker.exists()


def test_pipe_shard_url_in_a_valid_manifest_is_refused(digits8, tmp_path):
    marker = tmp_path / "pwned"
    d = json.loads(Path(digits8).read_text())
    d["shards"][0]["url"] = f"pipe:touch {marker}; cat x.tar"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(d))  # valid JSON: only the pipe check stands in the way
    refusal = r"pipe:touch .*: 'pipe:' URLs run shell commands and are refused"
    with pytest.raises(ConfigError, match=refusal):
        Manifest.load(path)
    with pytest.raises(ConfigError, match=refusal):
        LatentStream(str(path), 8)
    assert not marker.exists()


@pytest.mark.parametrize("labels, bad", [([0, 1, 5, 1], 5), ([0, -1, 1, 0], -1)])
def test_labels_outside_the_classes_are_refused_at_write_time(tmp_path, labels, bad):
    source = ArraySource(np.zeros((4, 1, 2, 2), np.float32), labels, class_names=["a", "b"])
    with pytest.raises(ConfigError, match=rf"shard shard-000000.tar: input .* has label {bad}, outside the 2 classes"):
        write_shards(source, IdentityCodec(), tmp_path / "out", shard_size=4)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".prepare"]  # no shard, no temporary file


def data_copy(digits8, tmp_path) -> tuple[Manifest, Path]:
    dst = tmp_path / "data"
    shutil.copytree(Path(digits8).parent, dst)
    return Manifest.load(dst), dst / "manifest.json"


def test_labels_past_the_manifest_classes_are_refused_when_read(digits8, tmp_path):
    m, path = data_copy(digits8, tmp_path)
    fewer = m.to_json()
    fewer["class_names"] = fewer["class_names"][:5]  # the shards hold labels 0-9
    path.write_text(json.dumps(fewer))
    with pytest.raises(ShardLabelError, match=r"shard-0000\d\d.tar: label [5-9] is outside the manifest's 5 classes"):
        list(LatentStream(str(path), 64, epoch_length=4))  # not strict: still refused


def test_negative_label_in_a_hand_written_shard_is_refused(digits8, tmp_path):
    from webdataset import TarWriter

    m, path = data_copy(digits8, tmp_path)
    victim = Path(m.shard_urls()[0])
    lat = io.BytesIO()
    np.save(lat, np.zeros((2, *m.latent_shape), np.float16))
    with open(victim, "wb") as f, TarWriter(f, encoder=False) as w:
        for i, label in enumerate([3, -1, 4]):  # '-1' is no decimal: the member-by-member parser reads it
            w.write({"__key__": f"{i:08d}", "cls": str(label).encode(), "latents.npy": lat.getvalue()})
    d = m.to_json()
    d["shards"][0].update(count=3, sha256=hashlib.sha256(victim.read_bytes()).hexdigest(), bytes=victim.stat().st_size)
    d["num_samples"] = sum(s["count"] for s in d["shards"])
    path.write_text(json.dumps(d))  # a manifest that vouches for the shard: only the label check is left
    with pytest.raises(ShardLabelError, match=r"shard-000000.tar: label -1 is outside the manifest's 10 classes"):
        list(LatentStream(str(path), 64, epoch_length=40))
