"""Bad data is skipped and counted (or raised in strict mode, naming the shard); bad shard lists fail early."""

from __future__ import annotations

import tarfile

import pytest

from mmpretrain.data.classification import ImageLabelDataModule
from mmpretrain.data.shards import ShardError, ShardReadError
from mmpretrain.data.writer import ShardWriter
from tests.conftest import jpeg_bytes


def write_faulty_set(tmp_path):
    good = jpeg_bytes((200, 10, 10))
    with ShardWriter(tmp_path, prefix="a", shard_size=100, metadata={"classes": ["x", "y"]}) as w:
        for i in range(6):
            sample = {"__key__": f"{i:04d}", "jpg": good, "cls": i % 2}
            if i == 2:
                sample["jpg"] = good[: len(good) // 2]  # truncated JPEG
            if i == 4:
                del sample["cls"]  # missing label
            w.write(sample)
    tarfile.open(tmp_path / "b-000000.tar", "w").close()  # an empty tar
    with ShardWriter(tmp_path, prefix="c", shard_size=100) as w:
        for i in range(40):
            w.write({"__key__": f"c{i:04d}", "jpg": good, "cls": 1})
    data = (tmp_path / "c-000000.tar").read_bytes()
    (tmp_path / "c-000000.tar").write_bytes(data[: int(len(data) * 0.6) + 100])  # a truncated tar
    return str(tmp_path / "{a,b,c}-000000.tar")


def make_dm(pattern, strict=False, **kw):
    return ImageLabelDataModule(val_shards=pattern, image_size=16, batch_size=4, num_workers=0, strict=strict, **kw)


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path):
    dm = make_dm(write_faulty_set(tmp_path))
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    stats = dm.stats["val"].snapshot()
    assert stats["bad_image"] >= 1  # the truncated JPEG
    assert stats["missing_label"] == 1
    assert stats["empty_shard"] == 1
    assert stats["corrupt_shard"] == 1
    # plus, perhaps, the sample that the tar's truncation cut in half
    assert dm.stats["val"].skipped_samples in (2, 3)
    good_a = [k for k in keys if "a-000000" in k]
    assert len(good_a) == 4  # 6 written, 2 bad
    got_c = [k for k in keys if "c-000000" in k]
    assert 0 < len(got_c) < 40  # what precedes the truncation is kept


@pytest.mark.parametrize("fault", ["image", "truncated_tar"])
def test_strict_mode_raises_naming_the_shard(tmp_path, fault):
    pattern = write_faulty_set(tmp_path)
    if fault == "truncated_tar":
        pattern = str(tmp_path / "c-000000.tar")
    dm = make_dm(pattern, strict=True, num_classes=2)
    with pytest.raises(ShardReadError) as err:
        list(dm.val_dataloader())
    shard = "a-000000.tar" if fault == "image" else "c-000000.tar"
    assert shard in str(err.value)
    if fault == "image":
        assert "'0002'" in str(err.value)  # the key of the truncated JPEG


def test_missing_shards_fail_before_any_worker_starts(tmp_path):
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    dm = make_dm(pattern, num_classes=2)
    with pytest.raises(ShardError) as err:
        dm.val_dataloader()
    assert "data.val_shards" in str(err.value) and "nothing-{000000..000003}.tar" in str(err.value)
    with pytest.raises(ShardError, match="matches no file"):
        make_dm(str(tmp_path / "*.tar"), num_classes=2).val_dataloader()
    with pytest.raises(ShardError, match="empty"):
        make_dm([], num_classes=2).val_dataloader()


def test_unknown_class_count_is_a_config_error(tmp_path):
    with ShardWriter(tmp_path, prefix="a", shard_size=10) as w:  # no classes in the index
        w.write({"__key__": "0", "jpg": jpeg_bytes((1, 2, 3)), "cls": 0})
    dm = make_dm(str(tmp_path / "a-000000.tar"))
    with pytest.raises(ValueError, match="data.num_classes"):
        _ = dm.num_classes


def test_a_tar_cut_at_a_member_boundary_is_caught_by_its_index_count(tmp_path):
    with ShardWriter(tmp_path, prefix="c", shard_size=100, metadata={"classes": ["x", "y"]}) as w:
        for i in range(10):
            w.write({"__key__": f"c{i:04d}", "cls": i % 2, "jpg": jpeg_bytes((1, 2, 3))})
    path = tmp_path / "c-000000.tar"
    import tarfile as tf

    with tf.open(path) as t:
        cut = t.getmembers()[8].offset  # the header of the 5th sample: a clean member boundary
    path.write_bytes(path.read_bytes()[:cut])
    dm = make_dm(str(path))
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 4
    assert dm.stats["val"].snapshot() == {"corrupt_shard": 1}
    with pytest.raises(ShardReadError, match="index records 10"):
        list(make_dm(str(path), strict=True).val_dataloader())
