"""`python -m minipt.inspect`: nearest vocabulary tokens of a soft prompt (a prompt made of
copies of known token embeddings finds exactly those tokens), the printed report, errors."""
import pytest
import torch

from minipt.checkpoint import load_base, load_model
from minipt.inspect import main, nearest_tokens, soft_prompt
from minipt.prompts import PromptConfig, attach, save
from minipt.prompts.files import read_prompt

KNOWN = [5, 17, 42, 99]  # token ids whose embeddings become the virtual tokens


def copied_prompt(base):
    model = attach(base, PromptConfig(num_virtual_tokens=len(KNOWN), init="random"))
    with torch.no_grad():
        model.method.prompt.copy_(base.embed.weight[KNOWN])
    return model


def test_copies_of_token_embeddings_find_those_tokens(converted_dir, tmp_path):
    base = load_model(converted_dir("llama"))
    path = save(copied_prompt(base), tmp_path / "copies.safetensors")
    sims, ids = nearest_tokens(soft_prompt(*read_prompt(path)), base.embed.weight, k=3)
    assert ids.shape == sims.shape == (len(KNOWN), 3)
    assert ids[:, 0].tolist() == KNOWN
    assert torch.allclose(sims[:, 0], torch.ones(len(KNOWN)), atol=1e-5)
    # random embeddings: far apart, sorted
    assert (sims[:, 1] < 0.9).all() and (sims[:, :-1] >= sims[:, 1:]).all()


def test_p_tuning_is_read_through_its_computed_prompt(converted_dir, tmp_path):
    base = load_model(converted_dir("llama"))
    model = attach(base, PromptConfig(method="p_tuning", num_virtual_tokens=3, init="random",
                                      encoder_hidden=16))
    path = save(model, tmp_path / "pt.safetensors")
    with torch.no_grad():
        assert torch.equal(soft_prompt(*read_prompt(path)), model.method.input_prompt())


def test_cli_prints_method_count_and_neighbours(converted_dir, tmp_path, capsys):
    base, tokenizer = load_base(converted_dir("llama"))
    path = save(copied_prompt(base), tmp_path / "copies.safetensors", tokenizer)
    main([str(path), "--base", str(converted_dir("llama")), "--top", "2"])
    out = capsys.readouterr().out
    assert "method: prompt_tuning" in out
    assert f"trainable parameters: {len(KNOWN) * 64:,}" in out
    assert "embedding sha256: " in out and "n_layer=2" in out
    rows = [line.split() for line in out.split("nearest vocabulary tokens")[1].splitlines()[1:]]
    assert len(rows) == len(KNOWN)
    first = repr(tokenizer.decode([KNOWN[0]], skip_special=False))
    assert rows[0][0] == "0" and " ".join(rows[0]).startswith(f"0 {first} 1.000")


def test_cli_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:        # sys.exit(message): Python prints it and exits with 1
        main([str(tmp_path / "missing.safetensors")])
    line = e.value.code
    assert (line.startswith("error: ") and "\n" not in line
            and "missing.safetensors: no such prompt file" in line)
