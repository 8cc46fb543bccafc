"""The decode cache is an input too: an entry that is not what `commit` writes (its json's types, its rows, its
images' size, a stray file beside it) is a miss, said once, and the folder is decoded again, never read as garbage."""

import json

import numpy as np
import pytest

from foldercnn.data import cache
from foldercnn.data.folders import load_folder, scan_folder
from testkit import noise_folder

SIZE = 32


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FOLDERCNN_NO_CACHE", raising=False)
    return noise_folder(tmp_path / "data", ("a", "b"), seed=0)


def _damaged(n, good_npy):
    """name -> (json text or None, .npy bytes or None): what to write over the entry's two files."""
    import io

    def npy(array):
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    rows = list(range(n))
    return {
        "json holding []": ("[]", None),
        "json holding a number": ("7", None),
        "good as text": (json.dumps({"good": "0,1", "bad": []}), None),
        "good past the files": (json.dumps({"good": rows + [n, n + 1], "bad": []}), None),
        "a file missing": (json.dumps({"good": rows[:-1], "bad": []}), None),
        "bad not pairs": (json.dumps({"good": rows[:-1], "bad": [[n - 1]]}), None),
        "indices as floats": (json.dumps({"good": [float(i) for i in rows], "bad": []}), None),
        "images of another size": (None, npy(np.zeros((n, 16, 16, 3), np.uint8))),
        "float pixels": (None, npy(np.zeros((n, SIZE, SIZE, 3), np.float32))),
        "too few rows": (None, npy(np.zeros((n - 2, SIZE, SIZE, 3), np.uint8))),
        "truncated": (None, good_npy[:200]),
        "not a .npy": (None, b"garbage" * 20),
    }


def test_a_damaged_decode_cache_entry_is_decoded_again(folder, capfd):
    scanned = scan_folder(folder)
    want = load_folder(scanned, SIZE).images.numpy().copy()  # fills the cache
    npy, meta = cache._paths(cache.folder_key(scanned.files, SIZE))
    good_meta, good_npy = meta.read_text(), npy.read_bytes()
    assert cache.load(cache.folder_key(scanned.files, SIZE), SIZE, len(scanned.files)) is not None
    for name, (text, data) in _damaged(len(scanned.files), good_npy).items():
        meta.write_text(text if text is not None else good_meta)
        npy.write_bytes(data if data is not None else good_npy)
        capfd.readouterr()
        got = load_folder(scan_folder(folder), SIZE).images.numpy()
        assert np.array_equal(got, want), name
        err = capfd.readouterr().err
        assert err.count("decode cache entry") <= 1, name
        if text is not None or name in ("images of another size", "float pixels", "too few rows"):
            assert "decoding again" in err, name
        # decoding again wrote a good entry over the damaged one
        assert cache.load(cache.folder_key(scanned.files, SIZE), SIZE, len(scanned.files)) is not None, name


def test_a_stray_file_in_the_cache_folder_does_not_stop_a_new_folder(folder, tmp_path):
    (tmp_path / "cache" / "decoded").mkdir(parents=True)
    (tmp_path / "cache" / "decoded" / "zz.json").write_text("[]")
    (tmp_path / "cache" / "decoded" / "zy.json").write_text('{"root": 7}')
    got = load_folder(scan_folder(folder), SIZE)  # a new entry: the older ones of the same folder are looked for
    assert len(got.images) == 6
