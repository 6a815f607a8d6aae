"""Prompt files between tools: minipt -> peft adapter directories that
`PeftModel.from_pretrained` loads onto the transformers model (logits equal), peft -> minipt
back again, Google's .npy soft prompts, and the command line's refusals."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from minipt.checkpoint import load_model
from minipt.interop import export_peft, import_google_npy, import_peft, main
from minipt.prompts import PromptConfig, attach, load, save

from conftest import tiny_hf_model

P = 4
CASES = {  # method -> config fields
    "prompt_tuning": dict(init="random"),
    "p_tuning": dict(init="random", encoder_type="lstm", encoder_hidden=16),
    "prefix_tuning": dict(projection_hidden=24),
    "p_tuning_v2": dict(),
    "lora": dict(lora_r=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj", "down_proj"]),
}
GPT2_LORA = ["o_proj", "up_proj", "down_proj"]  # transformers fuses GPT-2's q, k, v (c_attn)


def ids_batch():
    return torch.randint(2, 120, (2, 9), generator=torch.Generator().manual_seed(0))


def trained_like(base, method, **overrides):
    """A method with values away from any fresh initialisation (LoRA's B is zero at first)."""
    model = attach(base, PromptConfig.for_method(method, num_virtual_tokens=P,
                                                 **{**CASES[method], **overrides}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def peft_logits(kind, adapter_dir, n_prompt):
    peft = PeftModel.from_pretrained(tiny_hf_model(kind), adapter_dir)  # inference mode, as a user loads it
    with torch.no_grad():
        return peft(input_ids=ids_batch()).logits[:, n_prompt:]  # drop the virtual tokens' columns


@pytest.mark.parametrize("kind,method", [(k, m) for k in ("llama",) for m in CASES]
                         + [("gpt2", "prompt_tuning"), ("gpt2", "prefix_tuning"), ("gpt2", "p_tuning_v2"),
                            ("gpt2", "lora")])
def test_export_loads_in_peft_and_imports_back(kind, method, converted_dir, tmp_path):
    overrides = dict(lora_targets=GPT2_LORA) if (kind, method) == ("gpt2", "lora") else {}
    model = trained_like(load_model(converted_dir(kind)), method, **overrides)
    with torch.no_grad():
        ours = model(ids_batch())[0]
    prompt = save(model, tmp_path / "task.safetensors")
    out = export_peft(prompt, tmp_path / "adapter", base=converted_dir(kind))

    config = json.loads((out / "adapter_config.json").read_text())
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert config["task_type"] == "CAUSAL_LM" and config["inference_mode"] is True
    if method == "lora":
        assert len(names) == 2 * 2 * len(model.method.config.lora_targets)  # 2 layers x targets x (A, B)
        assert config["fan_in_fan_out"] == (kind == "gpt2")
    else:
        assert names == {"prompt_embeddings"} and config["num_virtual_tokens"] == P
    if method in ("prefix_tuning", "p_tuning_v2"):  # llama: grouped-query, 2 kv heads of 16
        assert ((config["token_dim"], config["num_attention_heads"])
                == ((32, 2) if kind == "llama" else (64, 4)))

    n_prompt = P if method in ("prompt_tuning", "p_tuning") else 0
    theirs = peft_logits(kind, out, n_prompt)
    assert (ours - ours.mean()).abs().max() > 1e-2 and theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1e-4

    back = import_peft(out, load_model(converted_dir(kind)))
    # peft keeps the computed prompt: P-tuning's encoder output is a soft prompt, a projected prefix a table
    assert back.method.config.method == {"p_tuning": "prompt_tuning"}.get(method, method)
    with torch.no_grad():
        assert (back(ids_batch())[0] - ours).abs().max() <= 1e-4


def test_exported_lora_is_what_peft_itself_saves(converted_dir, tmp_path):
    """Save peft's own LoRA with our values: the same tensor names and config essentials."""
    from peft import LoraConfig, get_peft_model
    model = trained_like(load_model(converted_dir("llama")), "lora")
    export_peft(save(model, tmp_path / "lora.safetensors"), tmp_path / "ours")
    peft = get_peft_model(tiny_hf_model("llama"),
                          LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8.0,
                                     target_modules=["q_proj", "v_proj", "down_proj"]))
    peft.save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                    for d in ("ours", "theirs"))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                "use_rslora"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "theirs" / "adapter_model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(a.get_tensor(k).shape == b.get_tensor(k).shape for k in a.keys())


@pytest.mark.parametrize("method", ["prefix_tuning", "rslora"])
def test_adapters_saved_by_peft_import(method, converted_dir, tmp_path):
    """The other direction on its own: adapters peft wrote itself (a projected prefix; rsLoRA,
    whose alpha / sqrt(r) scale becomes ours alpha / r) import with the same logits."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24,
                                 prefix_projection=True) if method == "prefix_tuning" else
              LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8.0, target_modules=["k_proj", "up_proj"],
                         use_rslora=True))
    peft = get_peft_model(tiny_hf_model("llama"), config)
    with torch.no_grad():  # LoRA's B starts at zero
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    peft.save_pretrained(tmp_path / "peft")
    ref = peft_logits("llama", tmp_path / "peft", 0)
    back = import_peft(tmp_path / "peft", load_model(converted_dir("llama")))
    with torch.no_grad():
        ours = back(ids_batch())[0]
    assert (ours - load_model(converted_dir("llama"))(ids_batch())[0]).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4


def test_google_npy_round_trip_and_shape_refusal(converted_dir, tmp_path):
    base = load_model(converted_dir("t5-v1.1"))  # Google's prompts are T5 encoder prompts
    prompt = np.random.default_rng(0).normal(size=(P, 32)).astype(np.float32)
    np.save(tmp_path / "prompt.npy", prompt)
    model = import_google_npy(tmp_path / "prompt.npy", base)
    assert model.method.config.method == "prompt_tuning" and model.method.config.placement == "encoder"
    assert torch.equal(model.method.prompt, torch.from_numpy(prompt))

    ids, dec = ids_batch()[:, :6] % 100, torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids, decoder_input_ids=dec)[0]
    assert (logits - base(ids, dec)[0]).abs().max() > 1e-3  # the prompt is in the encoder input
    main(["import", str(tmp_path / "prompt.npy"), str(tmp_path / "p.safetensors"), "--base",
          str(converted_dir("t5-v1.1"))])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "p.safetensors", base)(ids, decoder_input_ids=dec)[0], logits)

    np.save(tmp_path / "wide.npy", np.zeros((P, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 64\).*expected \(num_virtual_tokens, 32\)"):
        import_google_npy(tmp_path / "wide.npy", base)


def test_refusals(converted_dir, tmp_path):
    llama = converted_dir("llama")
    adapter = tmp_path / "ia3"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="peft_type 'IA3' not supported"):
        import_peft(adapter, load_model(llama))

    model = trained_like(load_model(converted_dir("gpt2")), "lora", lora_targets=["q_proj"])
    with pytest.raises(ValueError, match="q_proj has no transformers counterpart.*c_attn"):
        export_peft(save(model, tmp_path / "qkv.safetensors"), tmp_path / "out")
    adapter_prompt = save(attach(load_model(llama), PromptConfig(method="adapter", num_virtual_tokens=P,
                                                                 adapter_layers=1)),
                          tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="method 'adapter' has no peft export"):
        export_peft(adapter_prompt, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # a LoRA that peft put on one layer only: ours would target both, so it is refused
    model = trained_like(load_model(llama), "lora")
    out = export_peft(save(model, tmp_path / "lora.safetensors"), tmp_path / "lora")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    save_file({k: v for k, v in load_file(weights).items() if ".layers.1." not in k}, weights)
    with pytest.raises(ValueError, match="no tensor for layers.1"):
        import_peft(out, load_model(llama))


def test_cli_errors_are_one_line_and_leave_nothing(converted_dir, tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    r = subprocess.run([sys.executable, "-m", "minipt.interop", "import", str(tmp_path / "bad.npy"),
                        str(tmp_path / "out.safetensors"), "--base", str(converted_dir("llama"))],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "bad.npy" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "bad.npy"), str(tmp_path / "adapter")])
    assert e.value.code.startswith("error: ") and not (tmp_path / "adapter").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.npy"]  # no temporary directory left behind


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_v2"])
def test_export_on_smollm2_gives_peft_the_same_logits(method, smollm2_dir, hf_smollm2, tmp_path):
    """The real model: a prompt exported from minipt, loaded by peft onto transformers'
    reading of the same GGUF file."""
    model = trained_like(load_model(smollm2_dir), method)
    ids = torch.randint(2, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[0]
    out = export_peft(save(model, tmp_path / "task.safetensors"), tmp_path / "adapter", base=smollm2_dir)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf_smollm2), out)  # the session's oracle stays untouched
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits[:, P if method == "prompt_tuning" else 0:]
    assert (theirs - ours).abs().max() <= 1e-3
