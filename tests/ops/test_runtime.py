"""The kernels' runtime helpers: the source key that ties compiled graphs to our ops' code."""

from __future__ import annotations

import pytest
import torch

from mmpretrain.ops import _runtime


def test_source_key_follows_every_source_file(tmp_path):
    """The key changes with a file's contents, with a file's name and with a new file, and only with them."""
    (tmp_path / "kernels.py").write_text("A = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ops.py").write_text("B = 2\n")
    (tmp_path / "notes.txt").write_text("not source")
    key = _runtime._source_key(tmp_path)
    assert 0 < key < 2**63  # an int64 in an op's schema
    assert _runtime._source_key(tmp_path) == key
    (tmp_path / "notes.txt").write_text("still not source")
    assert _runtime._source_key(tmp_path) == key
    (tmp_path / "sub" / "ops.py").write_text("B = 3\n")
    changed = _runtime._source_key(tmp_path)
    assert changed != key
    (tmp_path / "sub" / "ops.py").rename(tmp_path / "sub" / "ops2.py")
    renamed = _runtime._source_key(tmp_path)
    assert renamed not in (key, changed)
    (tmp_path / "extra.py").write_text("")
    assert _runtime._source_key(tmp_path) not in (key, changed, renamed)


def test_every_custom_op_takes_the_source_key():
    """Each mmpretrain custom op's schema ends with the source key, so the key enters every traced call."""
    pytest.importorskip("triton")
    import mmpretrain.ops.causal_conv1d.triton_kernels  # noqa: F401  (registers the ops)
    import mmpretrain.ops.selective_scan.custom_ops  # noqa: F401

    names = ["selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd",
             "causal_conv1d_bidir_fwd", "causal_conv1d_bidir_bwd"]
    for name in names:
        schema = getattr(torch.ops.mmpretrain, name).default._schema
        last = schema.arguments[-1]
        assert (last.name, str(last.type)) == ("source_key", "int"), (name, str(schema))
    assert _runtime._source_key(_runtime.Path(_runtime.__file__).parent) == _runtime.OPS_SOURCE_KEY
