"""Every mistake a user can make with a file or a flag is one clear line (issue 16).

Two tables. The library's loaders (checkpoint, config, tokenizer, compatibility checks) raise a
UserError whose message names the file and the key or tensor. evaluate.py turns any such error,
and every bad flag, into exactly one stderr line `error: ...`, exit status 2, no traceback; most
rows run main() in this process (through the same cli.run_main boundary as the script), a few run
the script as a subprocess to prove the wiring.
"""
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minialign import load_model, load_tokenizer, save_model
from minialign.checkpoint import read_state_dict
from minialign.cli import run_main
from minialign.compat import check_model_kind, check_same_tokenizer, check_tokenizer_fits
from minialign.config import ModelConfig
from minialign.errors import MissingFileError, UserError
from minialign.model import CausalLM, RewardModel
from minialign.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
SPLIT_CORPUS = ["Alpha beta gamma delta.", "Other words make another vocabulary entirely."] * 20


def tiny_cfg(vocab, **over):
    return ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, **over))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    """Good checkpoints (base, policy: causal LMs; rm: a reward model) on the tiny tokenizer, one
    causal LM on a different tokenizer ("stranger"), and a small preference file."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tok = load_tokenizer(tiny_tokenizer_dir)
    for name, cls in (("base", CausalLM), ("policy", CausalLM), ("rm", RewardModel)):
        torch.manual_seed(0)
        save_model(cls(tiny_cfg(len(tok))), root / name, tok)
    other_tok = train_bpe_tokenizer(SPLIT_CORPUS, root / "other_tokenizer", vocab_size=300)
    save_model(CausalLM(tiny_cfg(len(other_tok))), root / "stranger", other_tok)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                                        "rejected": "No idea."}) + "\n" for i in range(6)))
    return {"root": root, "data": data, "tok": tok}


def copy_checkpoint(world, name, dst):
    """A fresh copy of one of the world's checkpoints to damage."""
    import shutil

    shutil.copytree(world["root"] / name, dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------- the library

def damage(kind, folder):
    """Apply one kind of damage to a checkpoint folder; returns what the error must mention."""
    weights = folder / "model.safetensors"
    if kind == "config not JSON":
        (folder / "config.json").write_text('{"model_type": "qwen2",')
        return r"config.json \(the model's config\): not valid JSON"
    if kind == "config a list":
        (folder / "config.json").write_text("[1, 2]")
        return "config.json: expected a JSON object"
    if kind == "tokenizer.json not JSON":
        (folder / "tokenizer.json").write_text("{oops")
        return "tokenizer.json: not a readable tokenizer file"
    if kind == "tokenizer_config.json not JSON":
        (folder / "tokenizer_config.json").write_text("")
        return r"tokenizer_config.json \(the tokenizer's settings\): not valid JSON"
    if kind == "generation_config.json not JSON":
        (folder / "generation_config.json").write_text("{,}")
        return r"generation_config.json \(the model's generation settings\): not valid JSON"
    if kind == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "model.safetensors: not a readable safetensors file"
    if kind in ("int64 weight", "bool weight"):
        state = read_state_dict(folder)
        dtype = torch.int64 if kind == "int64 weight" else torch.bool
        state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
        save_file(state, str(weights), metadata={"format": "pt"})
        return "tensor 'model.norm.weight' is stored as (I64|BOOL); weights must be floating point"
    if kind == "bad index":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
        return "model.safetensors.index.json: expected a 'weight_map' object"
    raise AssertionError(kind)


CONFIG_VALUES = [  # (change to config.json, what the message must name)
    ({"vocab_size": 0}, "'vocab_size' = 0 must be an integer >= 1"),
    ({"hidden_size": "32"}, "'hidden_size' = '32' must be an integer >= 1"),
    ({"num_attention_heads": 0}, "'num_attention_heads' = 0"),
    ({"intermediate_size": 64.0}, "'intermediate_size' = 64.0"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' = True"),
    ({"rms_norm_eps": math.nan}, "'rms_norm_eps' = nan must be a finite positive number"),
    ({"rms_norm_eps": -1e-6}, "'rms_norm_eps' = -1e-06"),
    ({"rope_theta": 0}, "'rope_theta' = 0 must be a finite positive number"),
    ({"hidden_size": 30, "head_dim": None}, "hidden_size 30 is not divisible by num_attention_heads 4"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers = 3, but the weights .* hold layers 0..1 \(2 in all\)"),
]


@pytest.mark.parametrize("kind", ["config not JSON", "config a list", "tokenizer.json not JSON",
                                  "tokenizer_config.json not JSON", "generation_config.json not JSON",
                                  "truncated safetensors", "int64 weight", "bool weight", "bad index"])
def test_damaged_checkpoint_files_are_named(world, tmp_path, kind):
    folder = copy_checkpoint(world, "base", tmp_path / "ckpt")
    if kind == "generation_config.json not JSON" or kind.startswith("tokenizer"):
        message = damage(kind, folder)
        with pytest.raises(UserError, match=message):
            load_tokenizer(folder)
        return
    message = damage(kind, folder)
    with pytest.raises(UserError, match=message) as caught:
        load_model(folder)
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize("change,message", CONFIG_VALUES, ids=[str(c) for c, _ in CONFIG_VALUES])
def test_config_values_are_checked_by_key(world, tmp_path, change, message):
    folder = copy_checkpoint(world, "base", tmp_path / "ckpt")
    edit_config(folder, **change)
    with pytest.raises(UserError, match=message) as caught:
        load_model(folder)
    assert "config.json" in str(caught.value)


def test_absurd_layer_count_is_refused_before_building(world, tmp_path):
    """200,000 decoder layers would take minutes to build, even on the meta device; the headers'
    tensor names show 2 layers, so the load stops at once. (The bound is loose for a shared
    machine; the build it avoids takes minutes.)"""
    folder = copy_checkpoint(world, "base", tmp_path / "ckpt")
    edit_config(folder, num_hidden_layers=200_000)
    start = time.perf_counter()
    with pytest.raises(UserError, match="num_hidden_layers = 200000, but the weights"):
        load_model(folder)
    assert time.perf_counter() - start < 20


def test_missing_files_are_missing_file_errors(world, tmp_path):
    with pytest.raises(MissingFileError, match="no config.json"):
        load_model(tmp_path / "nowhere")
    folder = copy_checkpoint(world, "base", tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="neither model.safetensors nor"):
        load_model(folder)


def test_model_vocabulary_smaller_than_tokenizer(world, tmp_path):
    """A model with fewer embedding rows than the tokenizer has ids would fail with an IndexError
    at the first batch that uses a high id; the check names both folders first."""
    small = tiny_cfg(len(world["tok"]) - 1)
    with pytest.raises(UserError, match=rf"tokenizer of {tmp_path / 'tok'} produces token ids up to "
                                        rf"{len(world['tok']) - 1}, but the model in {tmp_path / 'm'} has only"):
        check_tokenizer_fits(small, world["tok"], tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    check_tokenizer_fits(tiny_cfg(len(world["tok"])), world["tok"], tmp_path / "m")  # exactly enough rows
    check_tokenizer_fits(tiny_cfg(len(world["tok"]) + 64), world["tok"], tmp_path / "m")  # padded rows are fine


def test_same_tokenizer_check(world):
    root, tok = world["root"], world["tok"]
    check_same_tokenizer(tok, root / "base", load_tokenizer(root / "policy"), root / "policy", "--base", "--policy")
    with pytest.raises(UserError, match=r"--policy .*base and --ref_model .*stranger use different tokenizers: "
                                        r"vocabulary size \(\d+ vs 300\).*vocabulary \(hash"):
        check_same_tokenizer(tok, root / "base", load_tokenizer(root / "stranger"), root / "stranger",
                             "--policy", "--ref_model")


def test_same_vocabulary_other_chat_format(world, tmp_path, tiny_tokenizer_dir):
    """Same tokenizer.json, another chat template (qwen2's default system prompt): still refused."""
    import shutil

    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    from minialign.tokenizer import SHORT_TEMPLATES

    cfg["chat_template"] = SHORT_TEMPLATES["qwen2"]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"use different tokenizers: chat format \(probe conversations rendered\) differ"):
        check_same_tokenizer(world["tok"], "a", load_tokenizer(tmp_path / "tok"), "b", "--base", "--policy")


def test_model_kind(world):
    root = world["root"]
    assert check_model_kind(root / "rm", True, "--reward_model").is_reward_model
    with pytest.raises(UserError, match=r"--reward_model .*base holds a causal LM \(Qwen2ForCausalLM\), but "
                                        r"--reward_model needs a reward model"):
        check_model_kind(root / "base", True, "--reward_model")
    with pytest.raises(UserError, match=r"--policy .*rm holds a reward model \(Qwen2ForSequenceClassification\)"):
        check_model_kind(root / "rm", False, "--policy")


# ------------------------------------------------------------------------- evaluate.py

@pytest.fixture(scope="module")
def evaluate_main():
    """evaluate.py's main, imported from its file (the name `evaluate` may belong to another package)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, f"exit status {code}, stderr:\n{stderr}"
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_in_process(evaluate_main, capsys, argv):
    with pytest.raises(SystemExit) as caught:
        run_main(evaluate_main, [str(a) for a in argv])
    return caught.value.code, capsys.readouterr().err


BAD_FLAGS = [  # (argv, fragments of the one error line)
    (["dpo", "--top_p", "0"], ["--top_p", "(0, 1]"]),
    (["dpo", "--top_p", "1.5"], ["--top_p", "(0, 1]"]),
    (["dpo", "--temperature", "-1"], ["--temperature", ">= 0"]),
    (["dpo", "--num_prompts", "0"], ["--num_prompts", ">= 1"]),
    (["dpo", "--num_prompts", "-1"], ["--num_prompts"]),
    (["dpo", "--samples_per_prompt", "0"], ["--samples_per_prompt"]),
    (["dpo", "--max_new_tokens", "0"], ["--max_new_tokens"]),
    (["dpo", "--max_prompt_length", "0"], ["--max_prompt_length"]),
    (["rm", "--batch_size", "0"], ["--batch_size", ">= 1"]),
    (["rm", "--max_length", "1"], ["--max_length", ">= 2"]),
    (["rm", "--n_resamples", "0"], ["--n_resamples"]),
    (["rm", "--num_pairs", "0"], ["--num_pairs"]),
    (["rm", "--seed", "-1"], ["--seed", ">= 0"]),
    (["rm", "--seed", "x"], ["--seed", "not an integer"]),
    (["rm", "--dtype", "fp8"], ["--dtype", "'fp8'"]),
    (["rm", "--data_format", "csv"], ["--data_format", "'csv'"]),
    (["rm", "--device", "gpu3"], ["--device", "not a device"]),
    (["implicit", "--beta", "0"], ["--beta"]),
    (["implicit", "--beta", "nan"], ["--beta", "finite"]),
    ([], ["command"]),
]


@pytest.mark.parametrize("argv,fragments", BAD_FLAGS, ids=[" ".join(a) or "no command" for a, _ in BAD_FLAGS])
def test_bad_flags(evaluate_main, capsys, argv, fragments):
    assert_one_line_error(*run_in_process(evaluate_main, capsys, argv), *fragments)


def bad_input_cases(world, tmp):
    """(argv, fragments) of evaluate.py runs whose files or flag combinations are wrong."""
    root, data = world["root"], world["data"]
    dpo = ["dpo", "--base", root / "base", "--policy", root / "policy", "--reward_model", root / "rm",
           "--data", data, "--output", tmp / "out"]
    broken_rm = copy_checkpoint(world, "rm", tmp / "broken_rm")
    (broken_rm / "config.json").write_text("{")
    huge = copy_checkpoint(world, "rm", tmp / "huge_rm")
    edit_config(huge, num_hidden_layers=200_000)
    small = copy_checkpoint(world, "rm", tmp / "small_rm")
    edit_config(small, vocab_size=100)
    state = read_state_dict(small)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:100].contiguous()
    save_file(state, str(small / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "plain.jsonl.gz").write_text(data.read_text())
    (tmp / "a_file").write_text("x")
    return [
        (["dpo", "--base", root / "base"], ["missing --policy, --reward_model, --data", "none of them"]),
        (["implicit", "--policy", root / "policy", "--data", data], ["missing --ref_model"]),
        (["rm", "--data", data], ["missing --reward_model"]),
        (["rm", "--reward_model", root / "base", "--data", data], ["--reward_model", "holds a causal LM",
                                                                    "needs a reward model"]),
        (dpo[:4] + [root / "rm"] + dpo[5:], ["--policy", "holds a reward model", "causal language model"]),
        (dpo[:6] + [root / "policy"] + dpo[7:], ["--reward_model", "holds a causal LM"]),
        (dpo[:4] + [root / "stranger"] + dpo[5:], ["--base", "--policy", "stranger", "use different tokenizers"]),
        (["implicit", "--policy", root / "policy", "--ref_model", root / "stranger", "--data", data],
         ["--policy", "--ref_model", "use different tokenizers"]),
        (["implicit", "--policy", root / "policy", "--ref_model", root / "base", "--data", data,
          "--max_prompt_length", 64, "--max_length", 64], ["--max_prompt_length 64 must be below --max_length 64"]),
        (["rm", "--reward_model", root / "nothing_here", "--data", data], ["--reward_model", "no checkpoint there"]),
        (["rm", "--reward_model", broken_rm, "--data", data], ["broken_rm/config.json", "not valid JSON"]),
        (["rm", "--reward_model", huge, "--data", data], ["num_hidden_layers = 200000, but the weights"]),
        (["rm", "--reward_model", small, "--data", data], ["produces token ids up to", "only 100 embedding rows"]),
        (["rm", "--reward_model", root / "rm", "--data", tmp / "none.jsonl"], ["not found", "none.jsonl"]),
        (["rm", "--reward_model", root / "rm", "--data", tmp / "plain.jsonl.gz"], ["plain.jsonl.gz: not a gzip file"]),
        (["rm", "--reward_model", root / "rm", "--data", data, "--output", tmp / "a_file"],
         ["--output", "a_file is a file, not a folder"]),
        (["curves", tmp / "not_a_run"], ["metrics.jsonl not found"]),
    ]


def test_bad_inputs(world, tmp_path, evaluate_main, capsys):
    """Each row: exit 2, one line naming the flag, file or key; nothing heavy ran (each row takes
    well under a second once torch is imported)."""
    for argv, fragments in bad_input_cases(world, tmp_path):
        code, stderr = run_in_process(evaluate_main, capsys, argv)
        assert_one_line_error(code, stderr, *map(str, fragments))


def test_demo_world_only_without_any_flag(world, tmp_path, evaluate_main, capsys, monkeypatch):
    """No model and no data flag: the demo world, announced in the first line (demo_paths is replaced
    by the tiny world here; building the real one takes minutes)."""
    import minialign.demo_build
    from minialign.demo_build import DemoPaths

    monkeypatch.setattr(minialign.demo_build, "demo_paths", lambda env: DemoPaths(world["root"] / "base", world["data"],
                                                                            world["data"], world["root"]))
    (tmp_path / "fresh").mkdir()
    monkeypatch.chdir(tmp_path / "fresh")  # runs/rm/model does not exist here: the demo RM is "not trained yet"
    code, err = run_in_process(evaluate_main, capsys, ["rm", "--n_resamples", 10])
    assert_one_line_error(code, err, "--reward_model runs/rm/model: no checkpoint there", "python train_rm.py")
    (tmp_path / "trained" / "runs" / "rm").mkdir(parents=True)
    (tmp_path / "trained" / "runs" / "rm" / "model").symlink_to(world["root"] / "rm")
    monkeypatch.chdir(tmp_path / "trained")
    run_main(evaluate_main, ["rm", "--n_resamples", "10", "--output", str(tmp_path / "demo_rm")])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("no --reward_model, --data given: evaluating the demo world")
    assert json.loads((tmp_path / "demo_rm" / "summary.json").read_text())["n"] == 6


@pytest.mark.parametrize("argv,fragments", [
    (["dpo", "--top_p", "0"], ["--top_p"]),
    (["implicit", "--policy", "x"], ["missing --ref_model, --data"]),
])
def test_script_prints_one_line(argv, fragments):
    """The same boundary when evaluate.py runs as a script."""
    proc = subprocess.run([sys.executable, "evaluate.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)


def test_debug_shows_the_traceback(world, tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "rm", "--reward_model", str(world["root"] / "base"),
                           "--data", str(world["data"]), "--debug"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "holds a causal LM" in proc.stderr
