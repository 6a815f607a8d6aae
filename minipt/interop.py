"""Prompt files moving between tools: minipt <-> peft adapter directories, and Google's
prompt-tuning `.npy` soft prompts -> minipt.

    python -m minipt.interop export PROMPT OUT_DIR [--base DIR] [--base-name NAME]
    python -m minipt.interop import SRC OUT.safetensors --base DIR     (SRC: a peft directory or a .npy file)

A peft adapter directory is `adapter_config.json` + `adapter_model.safetensors`, loaded
with `PeftModel.from_pretrained(hf_model, dir)` onto the transformers model a minipt
checkpoint was converted from. Decoder-only bases only (task_type CAUSAL_LM).

What peft keeps of a prompt-learning method is one tensor, "prompt_embeddings": the prompt
as computed at save time, not its reparameterisation. `from_pretrained` loads it in
inference mode, where the prompt encoder is just that table, used as is:
  - prompt tuning, P-tuning: the (P, d_model) vectors before the input (P-tuning's is the
    encoder's output);
  - prefix tuning (either peft setting of prefix_projection): the (P, L*2*kv) table of
    keys and values, kv = n_kv_head * head_dim (peft's token_dim; its num_attention_heads
    is n_kv_head), columns ordered (layer, key/value, head, head_dim) like ours.
So export computes the prompt, and an imported P-tuning adapter comes back as the soft
prompt it computes (prompt_tuning), a projected prefix as its table (prefix_tuning with
prefix_projection off); logits are the same, only the encoder / MLP to resume training from
is gone. LoRA keeps its A/B pairs, renamed to transformers' module paths.

Google's prompt-tuning code (T5X) saves a soft prompt as a (num_virtual_tokens, d_model)
`.npy` array; it imports as prompt_tuning, on the encoder input for T5.
"""
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cli import ArgumentParser
from .prompts import PromptConfig, PromptedModel, build_method, save
from .prompts.files import check_base, check_fingerprint, checkpoint_fingerprint, read_prompt
from .prompts.base import FROM_PEFT, REGISTRY, method_class
from .prompts.prefix import PrefixTable, PrefixTuning

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# LoRA targets: minipt's path inside a layer -> transformers', and where the layers live.
# GPT-2 fuses q, k, v into one Conv1D (c_attn), which per-projection LoRA does not map onto.
LORA_LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
LORA_MODULES = {
    "llama": {**{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
              **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}},
    "gpt2": {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"},
}
LORA_MODULES["qwen2"] = LORA_MODULES["llama"]


# ---- minipt -> peft -----------------------------------------------------------------------

def _prefix_width(model: dict) -> int:
    """peft's token_dim for prefix tuning: the key (or value) width of one layer."""
    return model["n_kv_head"] * model["head_dim"]


def peft_adapter(meta: dict, tensors: dict, base_name=None) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors) for a prompt file's metadata and
    tensors, with the config fields peft writes itself."""
    cfg, model = PromptConfig.from_dict(meta["config"]), meta["base"]["model"]
    method = method_class(cfg.method)
    config = {"task_type": "CAUSAL_LM", "inference_mode": True, "base_model_name_or_path": base_name,
              "revision": None, "auto_mapping": None, "modules_to_save": None}
    if method.peft_type == "LORA":
        return _lora_adapter(cfg, model["source"], tensors, config)
    config.update(num_virtual_tokens=cfg.num_virtual_tokens, num_transformer_submodules=1,
                  num_layers=model["n_layer"], token_dim=model["n_embd"], num_attention_heads=model["n_head"])
    if method.peft_type == "PROMPT_TUNING":
        config.update(peft_type="PROMPT_TUNING", prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
        return config, {"prompt_embeddings": tensors["prompt"]}
    if method.peft_type == "P_TUNING":  # the file holds the encoder's output as "prompt"
        config.update(peft_type="P_TUNING", encoder_reparameterization_type=cfg.encoder_type.upper(),
                      encoder_hidden_size=cfg.encoder_hidden, encoder_num_layers=2, encoder_dropout=0.0)
        return config, {"prompt_embeddings": tensors["prompt"]}
    config.update(peft_type="PREFIX_TUNING", token_dim=_prefix_width(model),
                  num_attention_heads=model["n_kv_head"], prefix_projection=PrefixTuning.projected(cfg),
                  encoder_hidden_size=cfg.projection_hidden, init_weights=None)
    return config, {"prompt_embeddings": _prefix_table(cfg, model, tensors)}


@torch.no_grad()
def _prefix_table(cfg: PromptConfig, model: dict, tensors: dict) -> torch.Tensor:
    """The (P, L*2*kv) table, through the MLP if there is one, exactly as the method computes it."""
    site = {k.removeprefix("sites.self."): v for k, v in tensors.items()}
    table = PrefixTable(cfg.num_virtual_tokens, model["n_layer"], _prefix_width(model), model["n_embd"],
                        "table" not in site, cfg.projection_hidden, torch.Generator())
    table.load_state_dict(site, strict=True)
    return table().contiguous()


def _lora_adapter(cfg: PromptConfig, family: str, tensors: dict, config: dict) -> tuple[dict, dict]:
    weights, targets = {}, set()
    for key, t in tensors.items():  # "layers.0.attn.q_proj.lora_A"
        path, _, which = key.rpartition(".")
        hf = _lora_hf_module(family, path)
        weights[f"base_model.model.{hf}.{which}.weight"] = t
        # peft matches a target by the end of the module path: GPT-2 has a c_proj in attn and in mlp
        targets.add(hf.rpartition(".")[2] if family != "gpt2" else hf.split(".", 3)[3])
    config.update(peft_type="LORA", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                  target_modules=sorted(targets), bias="none",
                  fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores its weights (in, out)
                  use_rslora=False, use_dora=False, init_lora_weights=True, layers_to_transform=None,
                  rank_pattern={}, alpha_pattern={})
    return config, weights


def _lora_hf_module(family: str, path: str) -> str:
    """minipt module path "layers.3.attn.q_proj" -> transformers' "model.layers.3.self_attn.q_proj"."""
    _, i, inner = path.split(".", 2)
    if inner not in LORA_MODULES[family]:
        hint = " (transformers fuses GPT-2's q, k, v into c_attn)" if family == "gpt2" else ""
        raise ValueError(f"LoRA on {family}: {inner} has no transformers counterpart here{hint}; "
                         f"supported: {', '.join(m.split('.')[1] for m in LORA_MODULES[family])}")
    return f"{LORA_LAYERS[family]}.{i}.{LORA_MODULES[family][inner]}"


def _exportable(path, meta: dict) -> None:
    method, model = meta["config"]["method"], meta["base"]["model"]
    exportable = [name for name in REGISTRY if method_class(name).peft_type]
    if method not in exportable:
        raise ValueError(f"{path}: method {method!r} has no peft export here ({', '.join(exportable)})")
    if model.get("model_type") != "gpt":
        raise ValueError(f"{path}: trained on a {model.get('model_type')!r} base; "
                         "peft export is for decoder-only models")
    if method_class(method).peft_type == "LORA" and model.get("source") not in LORA_MODULES:
        raise ValueError(f"{path}: LoRA on a {model.get('source')!r} checkpoint has no module map "
                         f"({', '.join(LORA_MODULES)})")


def export_peft(prompt_path, out_dir, base=None, tokenizer=None, base_name=None, force=False) -> Path:
    """Write a peft adapter directory for a minipt prompt file. `base` (a minipt checkpoint
    directory or model) is optional: given, the prompt must have been trained on it.
    `base_name` is recorded as base_model_name_or_path (the transformers model's id or path)."""
    meta, tensors = read_prompt(prompt_path)
    if isinstance(base, (str, Path)):             # a checkpoint directory: checked without loading it
        from .checkpoint import check_checkpoint
        _, tokenizer = check_checkpoint(base)
        check_fingerprint(prompt_path, meta, checkpoint_fingerprint(base, tokenizer))
    elif base is not None:
        check_base(prompt_path, meta, base, tokenizer)
    _exportable(prompt_path, meta)
    config, weights = peft_adapter(meta, tensors, base_name)

    def write(tmp):
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
    return _write_dir(Path(out_dir), write, force)


def _write_dir(out: Path, write, force: bool) -> Path:
    """Fill a temporary sibling directory, then rename: OUT appears complete or not at all."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- peft -> minipt -----------------------------------------------------------------------

def read_peft_config(adapter_dir) -> dict:
    d = Path(adapter_dir)
    try:
        return json.loads((d / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{d}: no {CONFIG_FILE} (expected a peft adapter directory)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / CONFIG_FILE}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_peft_weights(adapter_dir) -> dict:
    """The adapter's tensors, as fp32; safetensors only (an adapter_model.bin would be unpickled)."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: no {WEIGHTS_FILE} "
                                "(an adapter_model.bin is not read: it would be unpickled)")
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def import_peft(adapter_dir, base_model, tokenizer=None):
    """A PromptedModel on `base_model` (a minipt decoder-only model) from a peft adapter
    directory of type PROMPT_TUNING, P_TUNING, PREFIX_TUNING or LORA."""
    cfg, state = read_peft(adapter_dir, base_model.config)
    return _attach_with(Path(adapter_dir), base_model, cfg, state, tokenizer)


def read_peft(adapter_dir, model_config) -> tuple:
    """(PromptConfig, method state) of a peft adapter directory, for a base with this config."""
    d = Path(adapter_dir)
    config = read_peft_config(d)
    ptype, task = config.get("peft_type"), config.get("task_type")
    if ptype not in PEFT_TYPES:
        raise ValueError(f"{d}: peft_type {ptype!r} not supported ({', '.join(PEFT_TYPES)})")
    if task != "CAUSAL_LM" or model_config.model_type != "gpt":
        raise ValueError(f"{d}: task_type {task!r} onto a {model_config.model_type!r} model; "
                         "only CAUSAL_LM adapters onto decoder-only models are imported")
    tensors = read_peft_weights(d)
    if ptype == "LORA":
        return _lora_from_peft(d, config, tensors, model_config.source)
    return _prompt_from_peft(d, config, tensors, model_config)


def _attach_with(src, base, cfg: PromptConfig, state: dict, tokenizer=None):
    """The method built, filled and checked before it touches the base (LoRA changes it)."""
    method = build_method(cfg, base, tokenizer)
    wanted, given = set(method.state_for_saving()), set(state)
    if given != wanted:  # e.g. peft's LoRA on only some layers, where ours targets every layer with that name
        which, key = ("no", min(wanted - given)) if wanted - given else ("an unexpected", min(given - wanted))
        raise ValueError(f"{src}: {which} tensor for {key} (minipt's {cfg.method} has {len(wanted)})")
    try:
        method.load_saved(state)
    except RuntimeError as e:
        raise ValueError(f"{src}: tensors do not fit the method ({str(e).splitlines()[0]})") from None
    return PromptedModel(base, method.to(base.embed.weight.device))


def _prompt_from_peft(d: Path, config: dict, tensors: dict, model) -> tuple:
    """`model`: the base's GPTConfig."""
    P = config.get("num_virtual_tokens")
    if not isinstance(P, int):
        raise ValueError(f"{d / CONFIG_FILE}: num_virtual_tokens {P!r}, expected an integer")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(f"{d}: num_transformer_submodules {config['num_transformer_submodules']}, "
                         "expected 1 (CAUSAL_LM)")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{d / WEIGHTS_FILE}: no tensor 'prompt_embeddings'")
    emb = tensors["prompt_embeddings"]
    if config["peft_type"] == "PREFIX_TUNING":
        kv = model.n_kv_head * model.head_dim
        for key, ours in (("num_layers", model.n_layer), ("token_dim", kv),
                          ("num_attention_heads", model.n_kv_head)):
            if config.get(key) != ours:
                raise ValueError(f"{d / CONFIG_FILE}: {key} {config.get(key)!r}, this base needs {ours}")
        expected = (P, model.n_layer * 2 * kv)
        method = FROM_PEFT["PREFIX_TUNING" + (" with projection" if config.get("prefix_projection") else "")]
        cfg = PromptConfig(method=method, num_virtual_tokens=P, prefix_projection=False, init="random")
        state = {"sites.self.table": emb}
    else:  # prompt tuning, or P-tuning's computed prompt: a soft prompt either way
        expected = (P, model.n_embd)
        cfg, state = (PromptConfig(method=FROM_PEFT["PROMPT_TUNING"], num_virtual_tokens=P, init="random"),
                      {"prompt": emb})
    if tuple(emb.shape) != expected:
        raise ValueError(f"{d / WEIGHTS_FILE}: prompt_embeddings has shape {tuple(emb.shape)}, "
                         f"expected {expected} for this base")
    return cfg, state


# LoRA settings whose effect minipt's LoRA does not have; any of them on is refused
LORA_OFF = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
            "trainable_token_indices", "layer_replication", "target_parameters")


def _lora_from_peft(d: Path, config: dict, tensors: dict, family: str) -> tuple:
    on = [k for k in LORA_OFF if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if on:
        raise ValueError(f"{d / CONFIG_FILE}: LoRA option {on[0]} = {config[on[0]]!r} is not supported")
    if family not in LORA_MODULES:
        raise ValueError(f"{d}: LoRA onto a {family!r} checkpoint has no module map "
                         f"({', '.join(LORA_MODULES)})")
    back = {hf: ours for ours, hf in LORA_MODULES[family].items()}
    # "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" -> "layers.3.attn.q_proj.lora_A"
    pattern = re.compile(rf"^base_model\.model\.{re.escape(LORA_LAYERS[family])}"
                         r"\.(\d+)\.(.+)\.lora_([AB])\.weight$")
    state = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if not m or m.group(2) not in back:
            raise ValueError(f"{d / WEIGHTS_FILE}: tensor {key} is not a LoRA A/B "
                             f"of a supported {family} layer")
        state[f"layers.{m.group(1)}.{back[m.group(2)]}.lora_{m.group(3)}"] = t
    if not isinstance(config.get("r"), int) or "lora_alpha" not in config:
        raise ValueError(f"{d / CONFIG_FILE}: LoRA needs an integer r and lora_alpha")
    r, alpha = config["r"], float(config["lora_alpha"])
    if config.get("use_rslora"):  # scale alpha / sqrt(r); ours is alpha / r
        alpha *= math.sqrt(r)
    targets = sorted({k.rsplit(".", 2)[1] for k in state})
    cfg = PromptConfig(method=FROM_PEFT["LORA"], lora_r=r, lora_alpha=alpha,
                       lora_dropout=float(config.get("lora_dropout", 0.0)), lora_targets=targets)
    return cfg, state


# ---- Google prompt-tuning .npy -----------------------------------------------------------

def import_google_npy(npy_path, base_model, tokenizer=None):
    """A prompt_tuning PromptedModel from a (num_virtual_tokens, d_model) .npy soft prompt."""
    cfg, state = read_google_npy(npy_path, base_model.config)
    return _attach_with(Path(npy_path), base_model, cfg, state, tokenizer)


def read_google_npy(npy_path, model_config) -> tuple:
    """(PromptConfig, method state) of a .npy soft prompt, for a base with this config."""
    path = Path(npy_path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    d_model = model_config.d_model if model_config.model_type == "t5" else model_config.n_embd
    if array.ndim != 2 or array.shape[1] != d_model or array.shape[0] == 0 or array.dtype.kind != "f":
        raise ValueError(f"{path}: soft prompt of shape {array.shape} ({array.dtype}), "
                         f"expected (num_virtual_tokens, {d_model}) floats")
    # a soft prompt, as peft's prompt tuning stores one
    cfg = PromptConfig(method=FROM_PEFT["PROMPT_TUNING"], num_virtual_tokens=array.shape[0], init="random")
    return cfg, {"prompt": torch.from_numpy(array.astype(np.float32))}


def import_prompt(src, base_model, tokenizer=None):
    """A peft directory or a .npy file -> PromptedModel on base_model."""
    cfg, state = read_source(src, base_model.config)
    return _attach_with(Path(src), base_model, cfg, state, tokenizer)


def read_source(src, model_config) -> tuple:
    """(PromptConfig, method state) of a peft directory or a .npy file."""
    src = Path(src)
    if src.suffix == ".npy":
        return read_google_npy(src, model_config)
    if src.is_dir():
        return read_peft(src, model_config)
    raise FileNotFoundError(f"{src}: expected a peft adapter directory or a .npy file")


def import_to_file(src, out, base_dir, force=False) -> Path:
    """Import `src` onto the minipt checkpoint at base_dir and write a minipt prompt file;
    the source is read and checked against the base's config before the base loads."""
    from .checkpoint import check_checkpoint, load_base
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out}: already exists (pass --force to replace it)")
    config, _ = check_checkpoint(base_dir)
    cfg, state = read_source(src, config)
    base, tokenizer = load_base(base_dir)
    return save(_attach_with(Path(src), base, cfg, state, tokenizer), out, tokenizer)


# ---- command line ---------------------------------------------------------------------------

def main(argv=None):
    ap = ArgumentParser(prog="python -m minipt.interop", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="minipt prompt file -> peft adapter directory")
    ex.add_argument("prompt", help="minipt prompt file (.safetensors)")
    ex.add_argument("out_dir", help="peft adapter directory to create")
    ex.add_argument("--base",
                    help="minipt checkpoint the prompt must have been trained on (checked, optional)")
    ex.add_argument("--base-name",
                    help="recorded as base_model_name_or_path: the transformers model's id or path")
    ex.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    im = sub.add_parser("import",
                        help="peft adapter directory or Google .npy soft prompt -> minipt prompt file")
    im.add_argument("src", help="peft adapter directory or .npy file")
    im.add_argument("out", help="minipt prompt file to write (.safetensors)")
    im.add_argument("--base", required=True, help="minipt checkpoint directory to put the prompt on")
    im.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    try:
        if args.command == "export":
            out = export_peft(args.prompt, args.out_dir, args.base, base_name=args.base_name,
                              force=args.force)
        else:
            out = import_to_file(args.src, args.out, args.base, args.force)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
