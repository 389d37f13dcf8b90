import os

# DeepSpeed probes for an accelerator at import; on CPU machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Any Ray that the tests start binds to loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits8(tmp_path_factory):
    """The built-in digits data set as 8x8 pixel 'latents': 1,797 samples in 16 shards."""
    from dit.latents import make_digits, write_shards
    from dit.vae import IdentityCodec

    out = tmp_path_factory.mktemp("digits8")
    write_shards(make_digits(8), IdentityCodec(), out)
    return str(out / "manifest.json")
