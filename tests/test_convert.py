"""The converter refuses what it does not understand: one-line errors, no partial output."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipt.convert import ConversionError, convert

from conftest import save_tiny_hf, tiny_hf_model


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny_hf(tiny_hf_model("llama"), tmp_path / "hf")


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def assert_refused(src, out, *words):
    with pytest.raises(ConversionError) as err:
        convert(src, out)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists(), "a failed conversion left output behind"
    assert not [p for p in out.parent.iterdir()
                if p.name.startswith(f".{out.name}.")], "temporary files left behind"


def test_missing_key_is_named(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    assert_refused(hf_dir, tmp_path / "out", "model.layers.1.mlp.up_proj.weight", "missing")


def test_unknown_key_is_named(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    assert_refused(hf_dir, tmp_path / "out", "model.layers.0.extra.weight", "unknown")


def test_misshaped_key_is_named(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(63)))
    assert_refused(hf_dir, tmp_path / "out", "model.norm.weight", "(63,)", "(64,)")


def test_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(hf_dir, tmp_path / "out", "model.safetensors", "the data section has")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert_refused(bad, tmp_path / "out", "model.gguf", "GGUF")


def test_foreign_model_type(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert_refused(hf_dir, tmp_path / "out", "bert", "not supported")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path / "empty", tmp_path / "out", "config.json")


def test_legacy_bin_is_loaded_without_unpickling_code(hf_dir, tmp_path):
    sd = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    torch.save(sd, hf_dir / "pytorch_model.bin")
    convert(hf_dir, tmp_path / "ok")
    assert torch.equal(load_file(tmp_path / "ok" / "model.safetensors")["norm.weight"],
                       sd["model.norm.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))
    torch.save({"x": Evil()}, hf_dir / "pytorch_model.bin")
    assert_refused(hf_dir, tmp_path / "out", "refused", "it would call print")


def test_cli_exit_code_and_one_line_error(hf_dir, tmp_path):
    rewrite_weights(hf_dir, lambda sd: sd.pop("model.norm.weight"))
    run = subprocess.run([sys.executable, "-m", "minipt.convert", str(hf_dir), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "model.norm.weight" in run.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    convert(hf_dir, out)
    with pytest.raises(ConversionError, match="already exists"):
        convert(hf_dir, out)
    convert(hf_dir, out, force=True)
    assert (out / "model.safetensors").exists()
