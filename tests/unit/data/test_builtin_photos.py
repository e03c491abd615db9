"""The photographs shipped in the package: enough of them, each with its record and an allowed licence,
small, and split by name into train, test and held-out photos that never meet."""

import hashlib
import json

import pytest
from PIL import Image

from weatherkd.data import heldout
from weatherkd.data.photo_set import (BUILTIN_TEST_PHOTOS, HELDOUT_PHOTOS, PHOTO_DIR, PHOTO_RECORD, SynthSpec,
                                      build, builtin_catalogue, builtin_train_photos, load_photos)
from weatherkd.data.shards import MANIFEST, ShardSetError

# Free licences that let the photos ship beside Apache-2.0 code (SPDX ids; public-domain works have none).
ALLOWED = {"CC0-1.0", "LicenseRef-Public-Domain", "CC-BY-2.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0",
           "GPL-2.0-or-later"}
FIELDS = ("name", "file", "source", "source_version", "original_path", "author", "license", "resize")


def test_at_least_30_photos_each_on_disk_with_a_full_record_and_an_allowed_licence():
    records = json.loads(PHOTO_RECORD.read_text())
    assert len(records) >= 30
    assert len({r["name"] for r in records}) == len(records)
    on_disk = sorted(p.name for p in PHOTO_DIR.iterdir() if p.suffix == ".jpg")
    assert sorted(r["file"] for r in records) == on_disk
    readable = (PHOTO_DIR / "PHOTOS.md").read_text()
    for r in records:
        assert all(str(r[f]).strip() for f in FIELDS), r
        assert r["license"] in ALLOWED, r
        data = (PHOTO_DIR / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"], r["file"]
        with Image.open(PHOTO_DIR / r["file"]) as im:  # the header only: no decode
            assert im.format == "JPEG" and max(im.size) <= 1024, (r["file"], im.size)
        assert f"`{r['file']}`" in readable and r["author"] in readable


def test_the_set_stays_under_20_mb():
    assert sum(p.stat().st_size for p in PHOTO_DIR.iterdir()) <= 20e6


def test_train_test_and_heldout_photos_are_disjoint_and_cover_the_set():
    train, test, held = set(builtin_train_photos()), set(BUILTIN_TEST_PHOTOS), set(HELDOUT_PHOTOS)
    assert len(test) == len(BUILTIN_TEST_PHOTOS) >= 6 and len(held) == len(HELDOUT_PHOTOS) and train
    assert train.isdisjoint(test) and train.isdisjoint(held) and test.isdisjoint(held)
    assert train | test | held == set(builtin_catalogue())
    # `shards heldout`'s default photos: the reserved shipped ones, and greyscale ones the set does not ship.
    assert set(heldout.OTHER_PHOTOS) & set(builtin_catalogue()) == held
    assert set(heldout.GREY_PHOTOS).isdisjoint(builtin_catalogue())


def test_synth_reads_no_heldout_photo_and_splits_by_photo(tmp_path):
    assert [n for n, _ in load_photos("builtin")] == [*builtin_train_photos(), *BUILTIN_TEST_PHOTOS]
    manifest = build(str(tmp_path / "s"), "builtin", SynthSpec(train=4, test=6, size=32, test_size=48,
                                                               weathers=["snow"]))
    created = manifest["created_by"]
    assert created["test_photos"] == list(BUILTIN_TEST_PHOTOS)
    assert sorted(created["train_photos"]) == sorted(builtin_train_photos())
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["created_by"] == created
    # Fewer test photos take the first ones named; more than the named ones are refused.
    fewer = build(str(tmp_path / "f"), "builtin", SynthSpec(train=1, test=1, size=32, test_size=48,
                                                             weathers=["snow"], test_photos=2))
    assert fewer["created_by"]["test_photos"] == list(BUILTIN_TEST_PHOTOS[:2])
    assert set(BUILTIN_TEST_PHOTOS[2:]) <= set(fewer["created_by"]["train_photos"])
    with pytest.raises(ShardSetError, match="at most 6 test photos"):
        build(str(tmp_path / "x"), "builtin", SynthSpec(train=1, test=1, test_photos=7, weathers=["snow"]))
