"""Full fine-tuning: the baseline every parameter-efficient method is measured against
(Lester et al. 2021 compare prompt tuning with "model tuning"; Hu et al. 2021 with "FT").

Every base weight is trainable (`PromptedModel` leaves requires_grad on for this method),
and the "prompt file" is the whole base state dict, the tied embedding written once.

Trainable parameters = every parameter of the base model.
"""
import torch.nn as nn

from .base import PromptConfig, PromptMethod


def tied_aliases(base: nn.Module) -> set:
    """State-dict names that are a second name for a parameter already listed (a head tied
    to the embedding): safetensors stores a tensor once, so these are left out."""
    every = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in base.named_parameters()}


class FullFineTuning(PromptMethod):
    uses = ()
    changes_base = trains_base = True

    @classmethod
    def recipe(cls, config):
        return dict(lr=2e-5, warmup_steps=10)

    def __init__(self, config: PromptConfig, base, tokenizer=None):
        super().__init__(config)
        # a reference, not a submodule: the PromptedModel owns the base, and registering it
        # here too would put every weight in the state twice
        vars(self)["base"] = base

    def closed_form_parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def describe_count(self) -> str:
        return "every base parameter (a tied embedding counted once)"

    def state_for_saving(self) -> dict:
        skip = tied_aliases(self.base)
        return {k: v.detach().contiguous() for k, v in self.base.state_dict().items() if k not in skip}

    def load_saved(self, state: dict) -> None:
        missing, unexpected = self.base.load_state_dict(state, strict=False)
        missing = sorted(set(missing) - tied_aliases(self.base))  # tied ones are filled through their twin
        if missing or unexpected:
            raise RuntimeError(f"{'missing' if missing else 'unexpected'} tensor "
                               f"{(missing or unexpected)[0]}")
