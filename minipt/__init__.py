"""minipt: prompt tuning written out in plain PyTorch.

    from minipt import load_base, PromptConfig, attach
    base, tok = load_base("weights/smollm2-135m-instruct")
    model = attach(base, PromptConfig(method="prompt_tuning", num_virtual_tokens=20), tok)
"""
from .checkpoint import load_base, load_model
from .generation import generate
from .prompts import PromptConfig, attach, load as load_prompt, save as save_prompt
from .prompts.mixed import PromptBank

__all__ = ["load_base", "load_model", "generate", "PromptConfig", "attach", "load_prompt", "save_prompt",
           "PromptBank"]
