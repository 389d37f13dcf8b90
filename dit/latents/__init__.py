"""Prepared data: encode a data set once into WebDataset tar shards, stream them to every worker.

What lives where (imports point down this list, and below it only at ``dit.errors``,
``dit.files`` and ``dit.vae``)::

    sources.py   ImageSource and the sets ``prepare`` encodes (digits, image folders, arrays)
    manifest.py  the on-disk layout of a data folder: file names, the member layout of a
                 shard, ``manifest.json`` (Manifest), the damage error and warning
    writer.py    writing shards: ShardPlan, PrepareJob, begin_prepare, write_shards
    tarparse.py  parsing a shard's bytes (tar members, .npy) without pickle, vectorised
                 for the writer's layout, member by member for anything else
    order.py     the stream's order as index arithmetic (passes, slots, the shuffle buffer)
    shards.py    reading one shard: fetch, sha256, parse, damage reports
    stream.py    LatentStream: deterministic, resumable batches for every rank and worker

The package re-exports the public names (``from dit.latents import LatentStream``).
"""

from dit.latents.manifest import (
    FORMAT_VERSION,
    LATENTS_EXT,
    MANIFEST_NAME,
    STATE_DIR,
    CorruptShardError,
    Manifest,
    NoReadableShardsError,
    ShardLabelError,
    ShardInfo,
    ShardWarning,
    shard_name,
)
from dit.latents.sources import (
    ArraySource,
    DigitsSource,
    ImageFolderSource,
    ImageSource,
    RandomLatentsSource,
    center_crop_arr,
    make_digits,
)
from dit.latents.stream import LatentStream
from dit.latents.writer import PrepareJob, ShardPlan, begin_prepare, write_shards

__all__ = [
    "MANIFEST_NAME",
    "FORMAT_VERSION",
    "STATE_DIR",
    "LATENTS_EXT",
    "CorruptShardError",
    "NoReadableShardsError",
    "ShardLabelError",
    "ShardWarning",
    "center_crop_arr",
    "ImageSource",
    "ArraySource",
    "DigitsSource",
    "RandomLatentsSource",
    "ImageFolderSource",
    "make_digits",
    "ShardInfo",
    "Manifest",
    "ShardPlan",
    "shard_name",
    "PrepareJob",
    "begin_prepare",
    "write_shards",
    "LatentStream",
]
