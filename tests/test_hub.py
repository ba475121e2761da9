"""Hub ids resolved in a fake Hugging Face cache laid out as huggingface_hub writes it
(models--ORG--NAME/refs/main, snapshots/<hash>/), never over the network."""
import os
import shutil
from pathlib import Path

import pytest

import minialign
from minialign.errors import MissingFileError, UserError
from minialign.hub import resolve_model_path

GOLDEN_LLAMA = Path(__file__).parent / "fixtures" / "golden" / "llama"
HASHES = ("1111aaaa", "2222bbbb", "3333cccc")


def fake_repo(cache: Path, repo_id: str, main: str | None, newest: str = HASHES[-1]) -> Path:
    """Three snapshots with `newest` written last; refs/main names `main` (none when None)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for i, rev in enumerate(sorted(HASHES, key=lambda h: h == newest)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        os.utime(repo / "snapshots" / rev, (1_700_000_000 + i, 1_700_000_000 + i))
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main)  # huggingface_hub writes the hash without a newline
    return repo


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME / HOME all inside tmp_path, cwd an empty folder."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_refs_main_is_followed(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    repo = fake_repo(hub_env / "cache", "Qwen/Qwen2.5-0.5B-Instruct", main=HASHES[0])
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == repo / "snapshots" / HASHES[0]


def test_without_a_usable_refs_main_the_newest_snapshot_wins(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub_env / "hf"))
    repo = fake_repo(hub_env / "hf" / "hub", "org/a", main=None, newest=HASHES[1])
    assert resolve_model_path("org/a") == repo / "snapshots" / HASHES[1]
    repo = fake_repo(hub_env / "hf" / "hub", "org/b", main="0000dead", newest=HASHES[0])  # main not downloaded
    assert resolve_model_path("org/b") == repo / "snapshots" / HASHES[0]


def test_cache_order_and_the_default_location(hub_env, monkeypatch):
    """$HF_HUB_CACHE before $HF_HOME/hub before ~/.cache/huggingface/hub."""
    home_repo = fake_repo(hub_env / "home" / ".cache" / "huggingface" / "hub", "org/m", main=HASHES[2])
    assert resolve_model_path("org/m") == home_repo / "snapshots" / HASHES[2]
    monkeypatch.setenv("HF_HOME", str(hub_env / "hf"))
    hf_repo = fake_repo(hub_env / "hf" / "hub", "org/m", main=HASHES[1])
    assert resolve_model_path("org/m") == hf_repo / "snapshots" / HASHES[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    cache_repo = fake_repo(hub_env / "cache", "org/m", main=HASHES[0])
    assert resolve_model_path("org/m") == cache_repo / "snapshots" / HASHES[0]


def test_a_local_folder_always_wins(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    fake_repo(hub_env / "cache", "runs/rm", main=HASHES[0])
    (Path("runs") / "rm").mkdir(parents=True)
    assert resolve_model_path("runs/rm") == Path("runs/rm")
    assert resolve_model_path("runs/rm/model") == Path("runs/rm/model")  # not a Hub id: left to the caller


def test_a_missing_hub_id_is_one_line_with_the_download_command(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    with pytest.raises(MissingFileError) as e:
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", "--reward_model")
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert message.startswith("--reward_model Qwen/Qwen2.5-0.5B-Instruct: no such folder")
    assert str(hub_env / "cache") in message
    # `hf`, the command current huggingface_hub installs (issue #26, item 11), in both forms
    assert ("`hf download Qwen/Qwen2.5-0.5B-Instruct` (then --reward_model Qwen/Qwen2.5-0.5B-Instruct "
            "finds it)") in message
    assert ("`hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir Qwen2.5-0.5B-Instruct` "
            "and pass --reward_model Qwen2.5-0.5B-Instruct") in message


def test_refs_main_never_leads_out_of_the_cache(hub_env, monkeypatch):
    """refs/main holding an absolute path, or a relative one climbing out of snapshots/, is refused
    in one line (it was followed: issue #26, item 7); a snapshot that links out is never chosen."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    outside = hub_env / "elsewhere"
    outside.mkdir()
    for ref in (str(outside), "../../../elsewhere", ".."):
        repo = fake_repo(hub_env / "cache", "org/evil", main=ref)
        with pytest.raises(UserError, match="not a snapshot inside") as e:
            resolve_model_path("org/evil")
        assert "\n" not in str(e.value)
        shutil.rmtree(repo)
    repo = fake_repo(hub_env / "cache", "org/link", main=None)
    for h in HASHES:
        (repo / "snapshots" / h).rmdir()
    (repo / "snapshots" / "4444dddd").symlink_to(outside)  # the only snapshot leads outside
    with pytest.raises(MissingFileError):
        resolve_model_path("org/link")


def test_library_loaders_take_hub_ids(hub_env, monkeypatch, tiny_tokenizer_dir):
    """load_model and load_tokenizer resolve the id themselves, so the Python API gets it too."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    snapshot = fake_repo(hub_env / "cache", "tiny/llama", main=HASHES[0]) / "snapshots" / HASHES[0]
    for f in list(GOLDEN_LLAMA.glob("*.json")) + list(GOLDEN_LLAMA.glob("model.safetensors")):
        shutil.copy(f, snapshot)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, snapshot)
    assert minialign.load_model("tiny/llama").config.hidden_size == 32
    assert minialign.load_tokenizer("tiny/llama").chat_format == "chatml"
    with pytest.raises(MissingFileError, match="hf download tiny/other"):
        minialign.load_model("tiny/other")
