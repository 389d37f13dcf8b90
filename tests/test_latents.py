"""Latent shards: prepare (digits, image folder through a tiny real AutoencoderKL), resume,
refusals, and the deterministic, resumable, damage-tolerant stream."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import tarfile
import warnings

import numpy as np
import pytest
import torch

from dit.errors import ConfigError
from dit.files import temp_path
from dit.latents import (
    MANIFEST_NAME,
    ArraySource,
    CorruptShardError,
    ImageFolderSource,
    LatentStream,
    Manifest,
    ShardPlan,
    ShardWarning,
    begin_prepare,
    center_crop_arr,
    make_digits,
    write_shards,
)
from dit.latents.manifest import NoReadableShardsError
from dit.vae import IdentityCodec, VAECodec, load_codec
from orchestrator import cli

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def npy_member(t: tarfile.TarFile, name: str) -> np.ndarray:
    return np.load(io.BytesIO(t.extractfile(name).read()))


def tar_keys(path: str) -> list[str]:
    with tarfile.open(path) as t:
        return sorted({m.name.split(".", 1)[0] for m in t.getmembers()})


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "d16"
    write_shards(make_digits(16), IdentityCodec(), out, shard_size=256)
    return str(out)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (a stream that spins forever)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def temps_in(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".tmp-" in f]


def indexed_source(n: int, size: int = 2) -> ArraySource:
    """Sample i's latent is filled with the value i (exact in float16), so batches name their samples."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, size, size)).copy()
    return ArraySource(images, np.arange(n) % 3, name="indexed")


def ids(latents: torch.Tensor) -> list[int]:
    return latents[:, 0, 0, 0].round().long().tolist()


# ------------------------------------------------------------------------------------ prepare


def test_digits_manifest_counts_shapes_sha(digits_dir):
    m = Manifest.load(os.path.join(digits_dir, MANIFEST_NAME))
    assert m.num_samples == 1797 and sum(s.count for s in m.shards) == 1797
    assert [s.count for s in m.shards] == [256] * 7 + [5]
    assert m.latent_shape == (1, 16, 16) and m.dtype == "float16" and m.scale_factor == 1.0
    assert m.encoder_id == "identity" and m.encoder["kind"] == "identity"
    assert m.class_names == [str(c) for c in range(10)] and m.num_classes == 10
    assert m.image_size == 16 and m.flip and m.skipped_inputs == []
    assert m.tool_version.startswith("ditscale ")
    for s, url in zip(m.shards, m.shard_urls()):
        assert sha256(url) == s.sha256 and os.path.getsize(url) == s.bytes
    # every digit appears exactly once, with its flip
    keys = [k for url in m.shard_urls() for k in tar_keys(url)]
    assert len(keys) == len(set(keys)) == 1797
    src = make_digits(16)
    with tarfile.open(m.shard_urls()[0]) as t:
        members = {x.name: x for x in t.getmembers()}
        key = sorted(members)[0].split(".")[0]
        lat = npy_member(t, f"{key}.latents.npy")
        cls = int(t.extractfile(members[f"{key}.cls"]).read())
        src_key = t.extractfile(members[f"{key}.src.txt"]).read().decode()
    i = int(key)
    assert lat.dtype == np.float16 and lat.shape == (2, 1, 16, 16)
    assert cls == src.label(i) and src_key == src.key(i)
    np.testing.assert_allclose(lat[0], src.load(i), atol=1e-3)
    np.testing.assert_allclose(lat[1], src.load(i)[..., ::-1], atol=1e-3)


def test_center_crop_matches_adm_steps():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # by hand: 200 >= 128 → BOX to 100x150, then BICUBIC short side 64 → 64x96, crop rows 16:80
    ref = img.resize((100, 150), resample=Image.BOX)
    ref = np.asarray(ref.resize((64, 96), resample=Image.BICUBIC))[16:80]
    np.testing.assert_array_equal(out, ref)
    up = center_crop_arr(Image.fromarray(np.full((8, 8), 200, np.uint8)), 16)  # digits: upscaling
    assert up.shape == (16, 16) and abs(int(up.mean()) - 200) <= 1


def make_folder(root, n_per_class=3, size=(40, 48)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls)
        for k in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_folder_through_tiny_autoencoderkl(tmp_path, capsys):
    images = tmp_path / "images"
    make_folder(images)
    vae_dir = tmp_path / "vae"
    VAECodec.from_config(TINY_VAE, init_seed=0).vae.save_pretrained(vae_dir)
    out = tmp_path / "out"
    rc = cli.main(["prepare", "folder", str(images), "--out", str(out), "--vae", str(vae_dir), "--image-size", "16", "--local", "--shard-size", "4"])
    assert rc == 0, capsys.readouterr().err
    m = Manifest.load(str(out))  # a folder means folder/manifest.json
    assert m.num_samples == 6 and len(m.shards) == 2
    assert m.encoder == {"id": str(vae_dir), "kind": "vae", "scale_factor": 0.18215, "latent_dist": "mean"}
    assert m.latent_shape == (4, 8, 8) and m.class_names == ["cat", "dog"]
    assert sorted(s["key"] for s in m.skipped_inputs) == ["cat/broken.png", "dog/notes.txt"]
    # the stored latents are the codec's encoding of the preprocessed image (and its flip)
    codec = m.load_codec()
    assert isinstance(codec, VAECodec) and codec.scale_factor == 0.18215
    src = ImageFolderSource(images, 16)
    i = src.files.index("dog/1.png")
    x = torch.from_numpy(src.load(i))[None]
    want = codec.encode(torch.cat([x, x.flip(-1)])).numpy()
    shard = next(u for u in m.shard_urls() if f"{i:08d}" in tar_keys(u))
    with tarfile.open(shard) as t:
        got = npy_member(t, f"{i:08d}.latents.npy")
        assert int(t.extractfile(f"{i:08d}.cls").read()) == 1
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=2e-3)
    # the stream scales; decode(scaled=True) undoes it
    lat, lab = next(iter(LatentStream(m, 2, random_flip=False)))
    assert lat.shape == (2, 4, 8, 8) and lab.dtype == torch.long
    img = codec.decode(lat, scaled=True)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1


def test_vae_sample_mode_is_seeded(tmp_path):
    src = ArraySource(np.random.default_rng(0).uniform(-1, 1, (6, 3, 16, 16)), [0, 1, 0, 1, 0, 1])
    shas = []
    for k in range(2):
        codec = VAECodec.from_config(TINY_VAE, init_seed=0, latent_dist="sample")
        shas.append([s.sha256 for s in write_shards(src, codec, tmp_path / f"o{k}", shard_size=3).shards])
    assert shas[0] == shas[1]
    mean = write_shards(src, VAECodec.from_config(TINY_VAE, init_seed=0), tmp_path / "mean", shard_size=3)
    assert [s.sha256 for s in mean.shards] != shas[0]
    with pytest.raises(ConfigError, match="cannot be reloaded"):
        load_codec("config:random")


def test_interrupted_prepare_resumes_without_duplicates(tmp_path, monkeypatch):
    src = make_digits(8)
    ref = write_shards(src, IdentityCodec(), tmp_path / "ref", shard_size=300)
    out = tmp_path / "out"
    codec = IdentityCodec()
    calls = {"n": 0}
    real = codec.encode

    def dying(x, **kw):
        calls["n"] += 1
        if calls["n"] > 20:  # 300-sample shards / 32 per call: dies inside the third shard
            raise KeyboardInterrupt
        return real(x, **kw)

    monkeypatch.setattr(codec, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, codec, out, shard_size=300)
    assert not os.path.exists(out / MANIFEST_NAME)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # the half-written shard was removed
    done = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert done == ["shard-000000.tar", "shard-000001.tar"]
    stamps = {f: os.stat(out / f).st_mtime_ns for f in done}
    (out / "shard-000004.tar.tmp-deadbeef").write_bytes(b"left by a killed writer")
    monkeypatch.undo()
    job = begin_prepare(src, codec, out, shard_size=300)
    assert job.pending == [2, 3, 4, 5]
    assert not os.path.exists(out / "shard-000004.tar.tmp-deadbeef")
    m = write_shards(src, codec, out, shard_size=300)
    assert {f: os.stat(out / f).st_mtime_ns for f in done} == stamps  # finished shards not rewritten
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards]  # same contents as uninterrupted
    # a deleted shard is rewritten identically on the next run
    os.remove(out / "shard-000003.tar")
    assert begin_prepare(src, codec, out, shard_size=300).pending == [3]
    m2 = write_shards(src, codec, out, shard_size=300)
    assert m2.to_json() == m.to_json()
    keys = [k for u in m2.shard_urls() for k in tar_keys(u)]
    assert len(keys) == len(set(keys)) == 1797


def test_failed_manifest_write_is_clear_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    job = begin_prepare(make_digits(8), IdentityCodec(), out, shard_size=600)
    job.run_local(IdentityCodec())
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, old[1]))  # the manifest (a few KiB) cannot be written
    try:
        with pytest.raises(ConfigError, match=r"manifest.json: cannot write the manifest .*The shards are kept"):
            job.finish()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert not os.path.exists(out / MANIFEST_NAME) and temps_in(out) == []
    assert job.finish().num_samples == 1797  # the rerun writes just the manifest


def test_leftover_temps_of_a_crashed_run_are_swept_and_never_read(tmp_path):
    out = tmp_path / "out"
    first = write_shards(make_digits(8), IdentityCodec(), out, shard_size=600)
    os.makedirs(out / "features")
    # what a writer killed mid-rename leaves, named as dit.files names its temporary files
    for target in ("shard-000001.tar", MANIFEST_NAME, ".prepare/shard-000001.json", ".prepare/config.json",
                   "features/digits_classifier.pt"):
        with open(temp_path(out / target), "wb") as f:
            f.write(b"left by a killed writer")
    assert len(temps_in(out)) == 5
    batches = list(LatentStream(str(out), 64, epoch_length=29))  # the stream reads the manifest's names only
    assert len(batches) == 29
    again = write_shards(make_digits(8), IdentityCodec(), out, shard_size=600)
    assert again.to_json() == first.to_json()
    assert temps_in(out) == []


def test_shard_size_in_bytes(tmp_path):
    from orchestrator.cli.prepare import _parse_bytes

    assert _parse_bytes("64MB") == 64_000_000 and _parse_bytes("1GiB") == 2**30 and _parse_bytes("4096") == 4096
    m = write_shards(indexed_source(200, 8), IdentityCodec(), tmp_path / "o", shard_bytes=30_000)
    assert len(m.shards) > 10 and sum(s.count for s in m.shards) == 200
    assert max(s.bytes for s in m.shards) <= 30_000 + 10_240  # tar end-of-archive padding


def test_output_with_other_settings_is_refused(digits_dir, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    with pytest.raises(ConfigError, match=r"image_size.*--overwrite"):
        begin_prepare(make_digits(8), IdentityCodec(), out, shard_size=256)
    codec = VAECodec.from_config(TINY_VAE, encoder_id="other-vae")
    with pytest.raises(ConfigError, match="encoder.id"):
        begin_prepare(make_digits(16), codec, out, shard_size=256)
    m = write_shards(make_digits(8), IdentityCodec(), out, shard_size=256, overwrite=True)
    assert m.image_size == 8 and m.latent_shape == (1, 8, 8)


@pytest.mark.parametrize(
    "layout, match",
    [("missing", "does not exist"), ("empty", "is empty"), ("flat", "no class subfolders"), ("hollow", "hold no files")],
)
def test_bad_image_folders(tmp_path, layout, match):
    root = tmp_path / "imgs"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        (root / "a.png").write_bytes(b"x")
    if layout == "hollow":
        (root / "cat").mkdir()
    with pytest.raises(ConfigError, match=match):
        ImageFolderSource(root, 16)


def test_unreadable_only_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "x.jpg").write_text("nope")
    with pytest.raises(ConfigError, match="no readable images"):
        write_shards(ImageFolderSource(root, 16), IdentityCodec(), tmp_path / "out")


def test_cli_exit_codes(tmp_path, capsys, digits_dir):
    (tmp_path / "empty").mkdir()
    rc = cli.main(["prepare", "folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--vae", "identity", "--local"])
    assert rc == 2 and "is empty" in capsys.readouterr().err
    make_folder(tmp_path / "imgs")
    rc = cli.main(["prepare", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--vae", str(tmp_path / "no" / "vae"), "--local"])
    assert rc == 2 and "no such folder" in capsys.readouterr().err
    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    rc = cli.main(["prepare", "digits", "--out", str(out), "--image-size", "8", "--local"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = cli.main(["prepare", "digits", "--out", str(out), "--image-size", "16", "--shard-size", "256", "--local"])
    captured = capsys.readouterr()
    assert rc == 0 and "8 already complete" in captured.out  # same settings: nothing to redo
    with pytest.raises(SystemExit) as exc:  # argparse: missing --vae for folders
        cli.main(["prepare", "folder", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------- stream


def test_stream_batches_scaled_and_seeded(digits_dir):
    a = [b for b in LatentStream(digits_dir, 64, seed=3, epoch_length=6)]
    b = [b for b in LatentStream(digits_dir, 64, seed=3, epoch_length=6)]
    c = [b for b in LatentStream(digits_dir, 64, seed=4, epoch_length=6)]
    assert all(x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long for x, y in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, c))
    assert float(a[0][0].min()) >= -1.0 and float(a[0][0].max()) <= 1.0
    labels = torch.cat([y for _, y in a])
    assert len(torch.unique(labels)) == 10  # shards mix classes


def test_vae_scale_applied(tmp_path):
    src = ArraySource(np.full((4, 3, 16, 16), 0.5, np.float32), [0, 1, 0, 1])
    codec = VAECodec.from_config(TINY_VAE, init_seed=0, scale_factor=0.5)
    m = write_shards(src, codec, tmp_path / "o", shard_size=4, flip=False)
    lat, _ = next(iter(LatentStream(m, 4, shuffle_buffer=0)))
    raw = codec.encode(torch.from_numpy(src.images)).half().float()
    assert torch.allclose(lat.sort(0).values, (raw * 0.5).sort(0).values, atol=1e-4)


def read_ids(manifest, batches, **kw):
    stream = LatentStream(manifest, kw.pop("batch_size", 5), random_flip=False, epoch_length=batches, **kw)
    return [ids(x) for x, _ in stream]


@pytest.mark.parametrize("shard_size", [10, 40])  # 8 shards for 4 slots; 2 shards for 4 slots
def test_ranks_and_workers_read_disjoint_parts_covering_all(tmp_path, shard_size):
    m = write_shards(indexed_source(80), IdentityCodec(), tmp_path / "o", shard_size=shard_size)
    plan = ShardPlan(80, shard_size, 0)
    shard_of = {int(i): j for j in range(plan.num_shards) for i in plan.members(j)}
    slots = {}
    for rank in range(2):
        # 20 samples per slot per pass = 4 batches of 5; each rank's 2 workers alternate
        batches = read_ids(m.url, 8, rank=rank, world_size=2, num_workers=2, shuffle_buffer=7)
        for w in range(2):
            slots[(rank, w)] = [i for b in batches[w::2] for i in b]
    sets = [set(v) for v in slots.values()]
    assert all(len(v) == len(s) == 20 for v, s in zip(slots.values(), sets))  # no repeats within a pass
    assert set().union(*sets) == set(range(80))  # together: every sample once
    if shard_size == 10:  # whole shards per slot
        for s in sets:
            assert len({shard_of[i] for i in s}) == 2


def test_rank_is_passed_not_read_from_environment(tmp_path, monkeypatch):
    """rank/world_size default to 0/1 whatever RANK/WORLD_SIZE say; callers pass them."""
    m = write_shards(indexed_source(40), IdentityCodec(), tmp_path / "o", shard_size=10)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s = LatentStream(m, 5)
    assert (s.rank, s.world_size) == (0, 1)
    assert read_ids(m, 4) == read_ids(m, 4, rank=0, world_size=1) != read_ids(m, 4, rank=1, world_size=2)
    with pytest.raises(ConfigError, match="rank 2 / world_size 2"):
        LatentStream(m, 5, rank=2, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_batch_k_reproduces_tail(tmp_path, workers):
    m = write_shards(indexed_source(80), IdentityCodec(), tmp_path / "o", shard_size=10)
    kw = dict(batch_size=8, seed=5, num_workers=workers, shuffle_buffer=16)
    full = read_ids(m, 25, **kw)  # 25 batches: crosses pass boundaries (10 per pass)
    for k in (1, 7, 10, 13):
        assert read_ids(m, 25 - k, start_batch=k, **kw) == full[k:]
    # state_dict round trip after an interrupted (broken-off) loop
    stream = LatentStream(m, 8, seed=5, num_workers=workers, shuffle_buffer=16, random_flip=False)
    seen = []
    for x, _ in stream:
        seen.append(ids(x))
        if len(seen) == 9:
            break
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint
    resumed = LatentStream(m, 8, seed=5, num_workers=workers, shuffle_buffer=16, random_flip=False, epoch_length=6)
    resumed.load_state_dict(state)
    assert seen + [ids(x) for x, _ in resumed] == full[:15]
    assert resumed.position == 15
    with pytest.raises(ConfigError, match="batch_size"):
        LatentStream(m, 4, seed=5, num_workers=workers).load_state_dict(state)


def test_full_pass_is_a_permutation_and_resumes(tmp_path):
    """Large shards and a big buffer: gathers across many shards, compaction of stragglers."""
    m = write_shards(indexed_source(1000), IdentityCodec(), tmp_path / "o", shard_size=100)
    kw = dict(batch_size=50, seed=9, shuffle_buffer=300)
    full = read_ids(m, 30, **kw)  # 1.5 passes
    first_pass = [i for b in full[:20] for i in b]
    assert sorted(first_pass) == list(range(1000)) and first_pass != sorted(first_pass)
    assert read_ids(m, 30 - 17, start_batch=17, **kw) == full[17:]
    two = read_ids(m, 20, num_workers=2, **kw)
    assert sorted(i for b in two for i in b) == list(range(1000))
    assert read_ids(m, 20 - 5, num_workers=2, start_batch=5, **kw) == two[5:]


def test_vectorised_and_generic_parsers_agree(digits_dir):
    from dit.latents.shards import _fetch, _parse_generic, _Stats
    from dit.latents.tarparse import _parse_regular

    m = Manifest.load(digits_dir)
    spec = LatentStream(m, 8)._spec
    for j, url in enumerate(m.shard_urls()[:3]):
        fetched = _fetch(spec, j)
        assert fetched.sha_ok
        fast = _parse_regular(fetched.data, m.shards[j].count, m.latent_shape)
        slow = _parse_generic(spec, j, fetched, _Stats())
        assert fast is not None and fast.latents.shape == (m.shards[j].count, 2, 1, 16, 16)
        np.testing.assert_array_equal(fast.latents, slow.latents)
        np.testing.assert_array_equal(fast.labels, slow.labels)


def test_float16_output(digits_dir):
    a = list(LatentStream(digits_dir, 32, epoch_length=2, dtype=torch.float16))
    b = list(LatentStream(digits_dir, 32, epoch_length=2))
    assert a[0][0].dtype == torch.float16 and b[0][0].dtype == torch.float32
    assert all(torch.equal(x.float(), y) and torch.equal(la, lb) for (x, la), (y, lb) in zip(a, b))
    c = list(LatentStream(digits_dir, 32, epoch_length=1, dtype=torch.bfloat16))
    assert c[0][0].dtype == torch.bfloat16


def test_epoch_length_continues_and_flips_are_used(digits_dir):
    s = LatentStream(digits_dir, 32, epoch_length=3, shuffle_buffer=0)
    first, second = list(s), list(s)
    assert len(first) == len(second) == 3 and s.position == 6 and len(s) == 3
    whole = list(LatentStream(digits_dir, 32, epoch_length=6, shuffle_buffer=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first + second, whole))
    no_flip = list(LatentStream(digits_dir, 32, epoch_length=6, shuffle_buffer=0, random_flip=False))
    same = [torch.equal(a[0][i], b[0][i]) for a, b in zip(whole, no_flip) for i in range(32)]
    assert 0.3 < np.mean(same) < 0.7  # about half the samples come flipped


def damaged_copy(digits_dir, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    return Manifest.load(str(out))


def test_truncated_shard_skipped_and_counted(digits_dir, tmp_path):
    m = damaged_copy(digits_dir, tmp_path)
    victim = m.shard_urls()[2]
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2 + 100)  # cut inside a member
    with pytest.warns(ShardWarning, match="shard-000002.tar"):
        stream = LatentStream(m, 64, epoch_length=29, shuffle_buffer=100)  # one pass and a bit
        batches = list(stream)
    assert all(x.shape[0] == 64 for x, _ in batches)  # batch shape kept
    assert 100 < stream.skipped <= 256 and stream.bad_shards == {"shard-000002.tar"}
    with pytest.raises(CorruptShardError, match="shard-000002.tar"):
        list(LatentStream(m, 64, epoch_length=29, strict=True))


def test_sha_mismatch_reported_and_strict(digits_dir, tmp_path):
    m = damaged_copy(digits_dir, tmp_path)
    victim = m.shard_urls()[1]
    with open(victim, "r+b") as f:  # flip one byte inside a latent payload (headers stay valid)
        f.seek(512 * 3 + 128 + 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.warns(ShardWarning, match="sha256"):
        stream = LatentStream(m, 64, epoch_length=29)
        list(stream)
    assert stream.bad_shards == {"shard-000001.tar"} and stream.skipped == 0
    with pytest.raises(CorruptShardError, match=r"shard-000001.tar.*sha256"):
        list(LatentStream(m, 64, epoch_length=29, strict=True, num_workers=1))


def test_missing_shard_and_garbage_shard(digits_dir, tmp_path):
    m = damaged_copy(digits_dir, tmp_path)
    os.remove(m.shard_urls()[0])
    with open(m.shard_urls()[3], "wb") as f:
        f.write(os.urandom(4096))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = LatentStream(m, 64, epoch_length=29, num_workers=2)
        batches = list(stream)
    assert all(x.shape == (64, 1, 16, 16) for x, _ in batches)
    assert stream.skipped == 512 and stream.bad_shards == {"shard-000000.tar", "shard-000003.tar"}
    assert stream.stats()["skipped"] == 512  # (the warnings were raised in the worker processes)
    del caught


@pytest.mark.parametrize("workers", [0, 1])
def test_vanished_data_raises_naming_the_manifest(digits_dir, tmp_path, workers):
    m = damaged_copy(digits_dir, tmp_path)
    urls = m.shard_urls()
    n = len(urls)
    for u in urls[1:]:  # one shard left: damaged data, not vanished, the stream goes on
        os.remove(u)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        stream = LatentStream(m.url, 64, epoch_length=40, num_workers=workers)  # more than a pass
        batches = list(stream)
        assert len(batches) > 8 and all(x.shape[0] == 64 for x, _ in batches) and len(stream.bad_shards) == n - 1
        os.remove(urls[0])  # ... and then the volume is gone: an endless stream must not spin
        with deadline(60), pytest.raises(NoReadableShardsError, match=re.escape(
                f"manifest {m.url}: all {n} of its {n} shards are unreadable")) as err:
            next(iter(LatentStream(m.url, 64, num_workers=workers)))
    assert str(err.value).startswith("manifest ")  # not buried under a DataLoader's traceback


def test_pipe_urls_refused_unless_allowed(digits_dir, tmp_path):
    m = Manifest.load(digits_dir)
    d = m.to_json()
    for s, url in zip(d["shards"], m.shard_urls()):
        s["url"] = f"pipe:cat {url}"
    path = tmp_path / "piped.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="pipe:.*allow_pipe"):
        Manifest.load(str(path))
    with pytest.raises(ConfigError, match="allow_pipe"):
        LatentStream(str(path), 8)
    piped = list(LatentStream(str(path), 64, allow_pipe=True, epoch_length=3, seed=1))
    plain = list(LatentStream(digits_dir, 64, epoch_length=3, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(piped, plain))


def test_fsspec_urls(digits_dir):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name in os.listdir(digits_dir):
        if name.endswith((".tar", ".json")):
            fs.pipe(f"/ds16/{name}", open(os.path.join(digits_dir, name), "rb").read())
    remote = list(LatentStream("memory://ds16/manifest.json", 64, epoch_length=3, seed=2))
    local = list(LatentStream("file://" + os.path.join(digits_dir, MANIFEST_NAME), 64, epoch_length=3, seed=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(remote, local))
    with pytest.raises(ConfigError, match="not found"):
        Manifest.load("memory://nowhere/manifest.json")


def test_shards_are_plain_webdataset(digits_dir):
    import webdataset as wds

    m = Manifest.load(digits_dir)
    ds = wds.WebDataset(m.shard_urls()[:1], shardshuffle=False, nodesplitter=wds.split_by_node).decode()
    sample = next(iter(ds))
    assert sample["latents.npy"].shape == (2, 1, 16, 16) and isinstance(sample["cls"], int)
    assert sample["src.txt"].startswith("digits/")


# ---------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_prepare_through_local_ray_matches_local(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["prepare", "digits", "--image-size", "8", "--shard-size", "300"]
    assert cli.main([*args, "--out", str(tmp_path / "ray"), "--num-cpus", "2"]) == 0
    assert "Ray CPU actor" in capsys.readouterr().out
    assert cli.main([*args, "--out", str(tmp_path / "local"), "--local"]) == 0
    ray_m, local_m = Manifest.load(str(tmp_path / "ray")), Manifest.load(str(tmp_path / "local"))
    assert ray_m.num_samples == 1797 and len(ray_m.shards) == 6
    assert [s.sha256 for s in ray_m.shards] == [s.sha256 for s in local_m.shards]
