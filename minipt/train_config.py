"""`TrainConfig`, everything `train.py` reads, with its override parser:
`python train.py [config/NAME.py] [--key=value ...]`. Values are parsed to each field's type
and config files are read as literals, never executed.
"""
import ast
import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .data import check_template
from .prompts.base import REGISTRY, PromptConfig, method_class
from .quantized import KINDS as QUANT_KINDS
from .tasks import BUILTIN

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "bfloat16", "float32")
SHARDS = ("none", "fsdp")
NOT_EMPTY = ("method", "init", "base", "data", "out_dir", "optimizer", "schedule", "dtype", "device", "shard")


@dataclass
class TrainConfig(PromptConfig):
    """Everything `train.py` reads: the method's fields (inherited from PromptConfig) plus
    the training fields, flat, so that every key is `--key=value` on the command line.
    The defaults are the main job: a 20-token soft prompt for sentiment on SmolLM2."""
    init: str = "text"
    init_text: str = ""              # "" with init=text: the built-in task's own instruction (tasks.BUILTIN)
    base: str = "weights/smollm2-135m-instruct"  # a converted minipt checkpoint directory
    init_from: str = ""              # a prompt file to start from (SPoT transfer); "" = `init`
    data: str = "sentiment"          # built-in task (sentiment, topic, boolq, xsum) or JSONL path(s)
    template: str = ""               # "" = the task's own, e.g. "Review: {input}\nSentiment:"
    max_len: int = 256               # tokens per sequence (input truncated from the left)
    batch_size: int = 16             # global batch (split across DDP ranks)
    grad_accum: int = 1              # micro-batches per optimizer step
    bucket_batches: int = 8          # rows sorted by length within windows of this many batches (0: off)
    steps: int = 200                 # optimizer steps
    lr: "float | None" = None        # None: the method's recipe (PromptMethod.recipe)
    optimizer: str = "adamw"         # adamw | adafactor (Lester et al.: lr 0.3, decay 1e-5)
    weight_decay: float = 0.01       # AdamW decoupled weight decay (Adafactor: its own decay)
    warmup_steps: "int | None" = None   # None: the method's recipe
    adapter_layers: "int | None" = None  # None: the recipe's; negative: every layer but that many
    schedule: str = "linear"         # constant | linear | cosine (decay after warmup)
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    dtype: str = "auto"              # frozen weights' (auto: bfloat16 where the hardware has it, else float32)
    base_quant: str = "none"         # none | gguf (keep the GGUF's own 4/5/6/8-bit codes) | int8 (per channel)
    device: str = "cpu"              # cpu | cuda
    shard: str = "none"              # none | fsdp: under torchrun, each rank holds 1/N of the frozen base
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    compile: bool = False            # torch.compile the blocks: faster steps after a 20-60 s first one
    eval_interval: int = 50          # validation every N steps (0: only at the end)
    eval_examples: int = 200         # validation examples per evaluation
    log_interval: int = 10           # a training-loss line every N steps
    ckpt_interval: int = 50          # resumable checkpoint every N steps (0: never)
    seed: int = 0                    # data order, dropout and the method's random initialisation
    out_dir: str = "out/sentiment"   # where the prompt file, config.json, metrics.jsonl and plot.png go
    resume: bool = False             # continue out_dir's last checkpoint
    overwrite: bool = False          # replace an earlier run in out_dir (without it or resume: refused)

    def __post_init__(self):
        recipe = method_class(self.method).recipe(self) if self.method in REGISTRY else {}
        for key, value in recipe.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value}: must be a finite number")
            if f.name in NOT_EMPTY and not value.strip():
                raise ValueError(f"{f.name}={value!r}: must not be empty")
        super().__post_init__()
        for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("max_len", 2),
                         ("log_interval", 1), ("eval_examples", 1), ("warmup_steps", 0),
                         ("eval_interval", 0), ("ckpt_interval", 0),
                         ("bucket_batches", 0), ("lr", 0), ("weight_decay", 0), ("grad_clip", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key}={getattr(self, key)}: must be at least {low}")
        if self.dtype == "float16":  # its gradients underflow without a loss scale (a GradScaler)
            raise ValueError("dtype='float16': fp16 training needs loss scaling, which minipt does not do; "
                             "use dtype=bfloat16 (same memory, no scaling needed) or float32")
        for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("dtype", DTYPES),
                             ("base_quant", QUANT_KINDS), ("shard", SHARDS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r} unknown; choose one of {', '.join(choices)}")
        if self.base_quant != "none" and method_class(self.method).trains_base:
            raise ValueError(f"base_quant={self.base_quant} with method={self.method}: a quantized base is "
                             "frozen, and this method trains its weights (use lora, or base_quant=none)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r} unknown; choose cpu or cuda (cuda:N)")
        if self.template:
            check_template(self.template)
        if self.init_text and not self.init_text.strip():
            raise ValueError(f"init_text={self.init_text!r}: only spaces; give words, or leave it unset "
                             "for the task's own")
        if self.init == "text" and not self.init_text and "init" in self.method_fields():
            if self.data not in BUILTIN:
                raise ValueError(f"init=text: give init_text (data={self.data!r} is no built-in task "
                                 "with an instruction)")
            self.init_text = BUILTIN[self.data][4]
        if self.shard == "fsdp" and method_class(self.method).trains_base:
            raise ValueError(f"shard=fsdp shards the frozen base, and method={self.method} trains all of it; "
                             "use shard=none (data parallel, the whole model on every rank)")
        if self.shard == "fsdp" and self.method == "adapter":
            raise ValueError("shard=fsdp with method=adapter: the adapter runs its prompts through the blocks' "
                             "k_proj/v_proj outside the blocks, where their weights are sharded; use shard=none")
        if self.shard == "fsdp" and self.base_quant != "none":
            raise ValueError(f"shard=fsdp with base_quant={self.base_quant}: FSDP shards parameters, and a "
                             "quantized base keeps its codes as buffers, whole on every rank; choose one")
        if self.shard == "fsdp" and self.compile:
            raise ValueError("shard=fsdp with compile=true: compiled blocks are not sharded blocks yet; "
                             "choose one")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, "
                             "or replace it")


HELP_GROUPS = {
    "method": ("method", "num_virtual_tokens", "init", "init_text", "init_labels", "init_from", "placement",
               "encoder_type", "encoder_hidden", "encoder_residual", "prefix_projection", "projection_hidden",
               "t5_prefix_sites", "adapter_layers", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "data": ("data", "template", "max_len", "bucket_batches"),
    "optimisation": ("steps", "batch_size", "grad_accum", "lr", "optimizer", "weight_decay", "warmup_steps",
                     "schedule", "grad_clip"),
    "run": ("base", "dtype", "base_quant", "device", "shard", "grad_checkpointing", "compile", "eval_interval",
            "eval_examples", "log_interval", "ckpt_interval", "seed", "out_dir", "resume", "overwrite"),
}


def field_comments() -> dict:
    """{key: the comment after its field}, from the source of PromptConfig and TrainConfig:
    the one place the keys are described (TrainConfig's comment wins where both have one)."""
    comments = {}
    for cls in (PromptConfig, TrainConfig):
        for line in inspect.getsource(cls).splitlines():
            found = re.match(r"    (\w+): .*?  # (.+)$", line)
            if found:
                comments[found[1]] = found[2]
    return comments


def help_text() -> str:
    """`python train.py --help`: every key with its type, default and meaning, grouped."""
    hints, comments = typing.get_type_hints(TrainConfig), field_comments()
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    kind = lambda t: " | ".join("None" if a is type(None) else a.__name__ for a in typing.get_args(t) or [t])
    from_recipe = {key for name in REGISTRY
                   for key in method_class(name).recipe(PromptConfig(method=name))}
    lines = ["usage: python train.py [config/NAME.py] [--key=value ...]",
             "Each key's default is below; a config file sets keys as `key = value` lines; "
             "later arguments win."]
    for group, keys in HELP_GROUPS.items():
        lines += ["", f"{group}:"]
        for key in keys:
            default = "(recipe)" if defaults[key] is None and key in from_recipe else repr(defaults[key])
            lines.append(f"  --{key:<19} {kind(hints[key]):<12} {default:<31} {comments.get(key, '')}")
    return "\n".join(lines)


def _parse_value(key: str, text: str, typ):
    """Turn the command-line text for `key` into the field's type."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}={text}: expected a boolean (true/false)")
    if typ is list or typing.get_origin(typ) is list:
        return [t.strip() for t in text.split(",") if t.strip()]
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {typ.__name__}") from None


def _check_type(key: str, value, typ):
    """A value from a config file must already have the field's type (ints pass as floats)."""
    allowed = [t for t in typing.get_args(typ) if typing.get_origin(typ) is not list]
    allowed = allowed or [typing.get_origin(typ) or typ]
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    def fits(t):
        if t is type(None):
            return value is None
        return isinstance(value, t) and not (t is int and isinstance(value, bool))  # True is an int too
    if not any(fits(t) for t in allowed):
        raise ValueError(f"{key}={value!r}: expected {' or '.join(t.__name__ for t in allowed)}")
    return value


def _read_config_file(path: str) -> dict:
    """`key = literal` lines of a config/NAME.py file, read with ast: nothing is executed."""
    try:
        src = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a config file (config/NAME.py)") from None
    except UnicodeDecodeError as e:
        bad = e.object[e.start]
        raise ValueError(f"{path}: not UTF-8 text (byte {bad:#04x} at offset {e.start})") from None
    try:
        body = ast.parse(src, filename=path).body
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    values = {}
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        targets = node.targets if isinstance(node, ast.Assign) else []
        if not (len(targets) == 1 and isinstance(targets[0], ast.Name)):
            raise ValueError(f"{path}:{node.lineno}: only `key = value` lines are allowed")
        try:
            values[node.targets[0].id] = (node.lineno, ast.literal_eval(node.value))
        except ValueError:
            raise ValueError(f"{path}:{node.lineno}: the value must be a literal "
                             "(number, string, list, bool)") from None
    return values


def parse_train_config(argv: list) -> TrainConfig:
    """`[config/NAME.py] [--key=value ...]` -> TrainConfig; later arguments win. Unknown keys
    and wrong types raise a one-line ValueError that lists the valid keys."""
    hints = typing.get_type_hints(TrainConfig)
    valid = f"valid keys: {', '.join(sorted(hints))}"
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, (line, value) in _read_config_file(arg).items():
                if key not in hints:
                    raise ValueError(f"{arg}:{line}: unknown key {key!r}; {valid}")
                values[key] = _check_type(f"{arg}:{line}: {key}", value, hints[key])
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in hints:
            raise ValueError(f"unknown key {key!r}; {valid}")
        if not eq and hints[key] is not bool:
            raise ValueError(f"--{key}: give a value, --{key}=...")
        values[key] = _parse_value(key, text if eq else "true", hints[key])
    return TrainConfig(**values)
