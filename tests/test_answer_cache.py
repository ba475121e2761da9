"""minialign.answer_cache: a key changes with every setting and every byte of the model files, and
only a file written under the same key is read back."""
import json

import pytest

from minialign.answer_cache import cache_key, folder_fingerprint, ids_digest, read_cached, write_cached
from minialign.errors import UserError


def test_fingerprint_follows_file_bytes_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"hidden_size": 8}')
        (d / "model.safetensors").write_bytes(b"\x00\x01\x02")
        (d / "notes.txt").write_text("not part of the model")
    assert folder_fingerprint(a) == folder_fingerprint(b)
    (b / "notes.txt").write_text("changed")  # not a model file: the same answers
    assert folder_fingerprint(a) == folder_fingerprint(b)
    (b / "model.safetensors").write_bytes(b"\x00\x01\x03")  # one weight byte
    assert folder_fingerprint(a) != folder_fingerprint(b)


def test_key_is_order_free_and_changes_with_any_setting():
    base = {"temperature": 0.7, "top_p": 0.9, "seed": 0, "prompt_ids": ids_digest([[1, 2], [3]])}
    assert cache_key(base) == cache_key(dict(reversed(list(base.items()))))
    for change in ({"temperature": 0.8}, {"seed": 1}, {"prompt_ids": ids_digest([[1, 2], [3, 4]])},
                   {"prompt_ids": ids_digest([[1], [2, 3]])}):
        assert cache_key({**base, **change}) != cache_key(base)


def test_round_trip_and_foreign_files(tmp_path):
    key = cache_key({"a": 1})
    assert read_cached(tmp_path, "base_answers", key) is None
    path = write_cached(tmp_path, "base_answers", key, {"a": 1}, {"texts": ["hi"], "finished": [True]})
    assert read_cached(tmp_path, "base_answers", key) == {"texts": ["hi"], "finished": [True]}
    assert json.loads(path.read_text())["settings"] == {"a": 1}
    assert read_cached(tmp_path, "base_answers", cache_key({"a": 2})) is None  # another key, another file
    path.write_text(json.dumps({"key": "something else", "payload": []}))
    with pytest.raises(UserError, match="not a cache file"):
        read_cached(tmp_path, "base_answers", key)
