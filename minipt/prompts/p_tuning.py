"""P-tuning (Liu et al. 2021, *GPT Understands, Too*): the soft prompt is not learned
directly but produced by a small prompt encoder, which the paper found to train more
stably than free vectors:

    lstm:  P embeddings (P, C) -> bidirectional 2-layer LSTM (P, 2h) -> Linear(2h, 2h), ReLU,
           Linear(2h, C) -> prompt (P, C)
    mlp:   P embeddings (P, C) -> Linear(C, h), ReLU, Linear(h, h), ReLU, Linear(h, C)

The submodule names (embedding, lstm_head, mlp_head) and layer shapes are peft's
PromptEncoder's, so weights copy across one to one.

With `encoder_residual` (the default) the prompt is the embeddings plus the encoder's
output, and the encoder's last layer starts at zero: at step 0 the prompt is exactly its
initial vectors (the text's embeddings with init="text"), which an encoder of random weights
would scramble. Off, it is the encoder's output alone, as in the paper and peft.

The encoder is only needed while training: `collapse()` computes the prompt once and from
then on the method serves those plain vectors, exactly like a soft prompt. A prompt file
holds both the encoder (training can resume) and the collapsed prompt (inference never runs
the encoder); a loaded method starts collapsed, and `model.train()` switches the encoder
back on.

Trainable parameters, with d = d_model, h = encoder_hidden:
    embedding P d, plus
    lstm:  LSTM 8hd + 32h^2 + 32h  (2 layers x 2 directions x 4 gates, two bias vectors each)
           + MLP 4h^2 + 2h + 2hd + d
    mlp:   2hd + h^2 + 2h + d
"""
import math

import torch
import torch.nn as nn

from .base import PromptConfig, PromptMethod, model_dims
from .soft_prompt import SoftPrompt, embedding_scale, initial_prompt


def default_init(module: nn.Module, g: torch.Generator) -> None:
    """PyTorch's own initialisation of the Embedding, LSTM and Linear layers in `module`, in
    the order they were built, drawn from g: the values a global RNG seeded like g gave."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, generator=g)
        elif isinstance(m, nn.LSTM):
            bound = 1 / math.sqrt(m.hidden_size)
            for w in m.parameters():
                nn.init.uniform_(w, -bound, bound, generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            bound = 1 / math.sqrt(m.in_features)
            nn.init.uniform_(m.bias, -bound, bound, generator=g)


class PromptEncoder(nn.Module):
    def __init__(self, init: torch.Tensor, hidden: int, kind: str, residual: bool, g: torch.Generator):
        """The layers start at PyTorch's default init drawn from g, on the CPU (the same
        values on any device); the global RNG, CPU or CUDA, is never drawn from or seeded."""
        super().__init__()
        P, C = init.shape
        self.kind, self.residual = kind, residual
        with torch.device("meta"):                    # built without their own init's draws
            self.embedding = nn.Embedding(P, C)
            if kind == "lstm":
                self.lstm_head = nn.LSTM(C, hidden, num_layers=2, bidirectional=True, batch_first=True)
                self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                              nn.Linear(2 * hidden, C))
            elif kind == "mlp":
                self.mlp_head = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                              nn.ReLU(), nn.Linear(hidden, C))
            else:
                raise ValueError(f"P-tuning: encoder_type {kind!r} unknown; choose lstm or mlp")
        self.to_empty(device="cpu")
        with torch.no_grad():
            default_init(self, g)                     # the embedding's draw too: the layers a seed always gave
            self.embedding.weight.copy_(init)
        if residual:
            nn.init.zeros_(self.mlp_head[-1].weight)
            nn.init.zeros_(self.mlp_head[-1].bias)

    def forward(self):
        x = self.embedding.weight[None]                                         # (1, P, C)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]                                            # (1, P, 2h)
        out = self.mlp_head(x)[0]                                               # (P, C)
        return out + self.embedding.weight if self.residual else out


class PTuning(PromptMethod):
    uses = ("num_virtual_tokens", "init", "init_text", "init_labels", "placement", "encoder_type",
            "encoder_hidden", "encoder_residual")
    choices = {**SoftPrompt.choices, "encoder_type": ("lstm", "mlp")}
    holds_soft_prompt = True                # the encoder's output, saved as "prompt" (see load_saved)
    peft_type = "P_TUNING"

    @classmethod
    def recipe(cls, config):
        # the embeddings train as a soft prompt's do; 84.2 % sentiment, 89.2 % topic (as SoftPrompt)
        return dict(lr=1e-2, warmup_steps=10)

    @classmethod
    def virtual_positions(cls, config):
        return config.num_virtual_tokens

    def __init__(self, config: PromptConfig, base, tokenizer=None):
        super().__init__(config)
        self.n_input_tokens = P = config.num_virtual_tokens
        self.d_model = model_dims(base)["d_model"]
        init = initial_prompt(config, base.embed, tokenizer, P, embedding_scale(base))
        self.encoder = PromptEncoder(init, config.encoder_hidden, config.encoder_type, config.encoder_residual,
                                     torch.Generator().manual_seed(config.seed))
        self.register_buffer("collapsed", None, persistent=False)               # (P, C) once collapsed

    def input_prompt(self):
        return self.collapsed if self.collapsed is not None else self.encoder()  # (P, C)

    @torch.no_grad()
    def collapse(self):
        """Serve the encoder's current output as fixed vectors (no encoder cost, no gradient)."""
        self.collapsed = self.encoder().detach()

    def uncollapse(self):
        """Run the encoder again, e.g. to resume training from a prompt file."""
        self.collapsed = None

    def train(self, mode: bool = True):
        if mode:  # fixed vectors would get no gradient: training always runs the encoder
            self.uncollapse()
        return super().train(mode)

    def closed_form_parameters(self) -> int:
        P, d, h = self.n_input_tokens, self.d_model, self.config.encoder_hidden
        if self.config.encoder_type == "lstm":
            return P * d + (8 * h * d + 32 * h * h + 32 * h) + (4 * h * h + 2 * h + 2 * h * d + d)
        return P * d + 2 * h * d + h * h + 2 * h + d

    def describe_count(self) -> str:
        P, d, h = self.n_input_tokens, self.d_model, self.config.encoder_hidden
        if self.config.encoder_type == "lstm":
            return (f"embedding {P} x {d} + BiLSTM(2 layers, h {h}) 8hd + 32h^2 + 32h "
                    f"+ MLP 4h^2 + 2h + 2hd + d")
        return f"embedding {P} x {d} + MLP(h {h}) 2hd + h^2 + 2h + d"

    def state_for_saving(self) -> dict:
        """The encoder's weights, plus "prompt": its output (P, C), computed now if not collapsed."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with torch.no_grad():
            state["prompt"] = self.input_prompt().detach().contiguous()
        return state

    def load_saved(self, state: dict) -> None:
        state = dict(state)
        prompt = state.pop("prompt", None)
        if prompt is None or prompt.shape != (self.n_input_tokens, self.d_model):
            raise RuntimeError("P-tuning: collapsed prompt missing or not "
                               f"({self.n_input_tokens}, {self.d_model})")
        self.load_state_dict(state, strict=True)
        self.collapsed = prompt.to(self.encoder.embedding.weight.device)
