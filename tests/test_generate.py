"""generate.py on a tiny random Llama with SmolLM2's tokenizer: a prompt file and a
composition "a+b" give what the Python API gives; rank classification prints one label per
text; a missing prompt file is a one-line error; --compile prints the eager text."""
import pytest

import generate as generate_cli
from minipt.checkpoint import load_base
from minipt.convert import convert
from minipt.generation import generate
from minipt.prompts import PromptConfig, attach, load, save
from minipt.prompts.mixed import PromptBank

from conftest import save_tiny_hf, tiny_hf_model

TEXT = "Review: a gripping, funny film\nSentiment:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    save_tiny_hf(tiny_hf_model("llama", vocab_size=49152), root / "hf")
    convert(root / "hf", root / "minipt")
    base, tok = load_base(root / "minipt")
    files = []
    for seed, method in enumerate(["prompt_tuning", "prefix_tuning"]):
        model = attach(base, PromptConfig.for_method(method, num_virtual_tokens=3, init="random", seed=seed,
                                          projection_hidden=16))
        files.append(save(model, root / f"{method}.safetensors", tok))
    return root / "minipt", files


def run(capsys, *argv):
    generate_cli.main(list(argv))
    return capsys.readouterr().out.strip()


def test_prompt_and_composition_match_the_api(setup, capsys):
    base_dir, (soft, prefix) = setup
    base, tok = load_base(base_dir)
    ids = [tok.encode(TEXT)]
    out = run(capsys, "--base", str(base_dir), "--prompt", str(soft), "--text", TEXT, "--max-new-tokens", "6")
    assert out == tok.decode(load(soft, base, tok).generate(ids, 6)[0], skip_special=True).strip()

    bank = PromptBank(load_base(base_dir)[0])
    bank.add("soft", soft, tok)
    bank.add("prefix", prefix, tok)
    composed = run(capsys, "--base", str(base_dir), "--prompt", f"{soft}+{prefix}", "--text", TEXT,
                   "--max-new-tokens", "6")
    expected = tok.decode(generate(bank.for_rows("soft+prefix"), ids, 6)[0], skip_special=True).strip()
    assert composed == expected


def test_labels_with_a_composed_prompt(setup, capsys):
    base_dir, (soft, prefix) = setup
    out = run(capsys, "--base", str(base_dir), "--prompt", f"{soft}+{prefix}", "--text", TEXT,
              "--text", "dull", "--labels", " negative, positive")
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)


def test_missing_prompt_file_is_a_one_line_error(setup, tmp_path):
    base_dir, (soft, _) = setup
    with pytest.raises(SystemExit, match="no such prompt file"):
        generate_cli.main(["--base", str(base_dir), "--prompt", f"{soft}+{tmp_path / 'nope.safetensors'}",
                           "--text", TEXT])


def test_lookup_gives_the_greedy_tokens(setup, capsys):
    """generate.py --lookup gives plain greedy decoding's text, and refuses sampling."""
    directory, files = setup
    base, tok = load_base(directory)
    model = load(files[0], base, tok)
    text = "the cat sat on the mat, the cat sat on the mat, the cat"
    ids = tok.encode(text)
    plain = generate(model, [ids], 40)
    assert generate(model, [ids], 40, lookup=6) == plain
    generate_cli.main(["--base", str(directory), "--prompt", str(files[0]), "--text", text,
                       "--max-new-tokens", "40", "--lookup", "6"])
    assert capsys.readouterr().out.strip() == tok.decode(plain[0], skip_special=True).strip()
    with pytest.raises(SystemExit, match="--lookup=4: a count >= 0, for greedy decoding of one text"):
        generate_cli.main(["--base", str(directory), "--text", text, "--lookup", "4", "--temperature", "0.7"])


def test_packed_without_4bit_codes_warns_and_packed_on_cuda_is_refused(setup, capsys):
    directory, _ = setup                                             # random fp32 weights: no 4-bit codes
    generate_cli.main(["--base", str(directory), "--text", TEXT, "--max-new-tokens", "2", "--packed"])
    err = capsys.readouterr().err
    assert "holds no exact 4-bit codes" in err and ", packed]" not in err
    with pytest.raises(SystemExit, match="--packed is for CPU decoding"):
        generate_cli.main(["--base", str(directory), "--text", TEXT, "--packed", "--device", "cuda"])


def test_compile_gives_the_eager_text_and_is_refused_for_t5(setup, t5_dir, capsys):
    directory, _ = setup
    argv = ["--base", str(directory), "--text", TEXT, "--text", "Hello", "--max-new-tokens", "6"]
    generate_cli.main(argv)
    eager = capsys.readouterr().out
    generate_cli.main(argv + ["--compile"])
    out = capsys.readouterr()
    assert out.out == eager and ", compiling included]" in out.err
    with pytest.raises(SystemExit, match="--compile: decoder models only"):
        generate_cli.main(["--base", str(t5_dir), "--text", TEXT, "--compile"])
