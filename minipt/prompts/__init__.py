"""Prompt-learning methods on a frozen base model, behind one interface.

    from minipt.prompts import PromptConfig, attach, load
    model = attach(base, PromptConfig(method="prompt_tuning", num_virtual_tokens=20), tokenizer)
    ... train model.trainable_parameters() ...
    save(model, "task.safetensors", tokenizer)
    model = load("task.safetensors", base, tokenizer)
"""
from ..layers import device_of
from .base import METHODS, PromptConfig, PromptMethod, method_class
from .files import base_fingerprint, check_base, check_fingerprint, read_prompt, save_prompt
from .model import PromptedModel


def build_method(config: PromptConfig, base, tokenizer=None) -> PromptMethod:
    """The method module for a config (not yet attached)."""
    return method_class(config.method)(config, base, tokenizer)


def attach(base, config: PromptConfig, tokenizer=None) -> PromptedModel:
    """Wrap a (frozen) base model with a freshly initialised prompt method."""
    method = build_method(config, base, tokenizer).to(device_of(base))
    return PromptedModel(base, method)


def save(model: PromptedModel, path, tokenizer=None, fingerprint=None):
    return save_prompt(path, model, tokenizer, fingerprint)


def load(path, base, tokenizer=None, fingerprint=None) -> PromptedModel:
    """A prompt file onto its base model; a one-line error if it belongs to another base.
    fingerprint: the base's (files.base_fingerprint), when the caller keeps it: hashing the
    embedding matrix is most of the time a load takes."""
    meta, tensors = read_prompt(path)
    check_fingerprint(path, meta, fingerprint or base_fingerprint(base, tokenizer))
    config = PromptConfig.from_dict(meta["config"])
    # values from the file
    model = attach(base, PromptConfig.for_method(**{**config.to_dict(), "init": "random"}))
    model.method.config = config
    _load_tensors(path, model.method, tensors)
    return model


def init_from(model: PromptedModel, path, tokenizer=None) -> None:
    """Prompt transfer (SPoT, Vu et al. 2022): start `model`'s freshly attached method from a
    prompt trained on another task (same base, method and shape), then train on."""
    meta, tensors = read_prompt(path)
    check_base(path, meta, model.base, tokenizer)
    saved, here = meta["config"]["method"], model.method.config.method
    if saved != here:
        raise ValueError(f"{path}: a {saved} prompt cannot initialise {here}")
    _load_tensors(path, model.method, tensors)


def _load_tensors(path, method, tensors):
    try:
        method.load_saved(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the method ({str(e).splitlines()[0]})") from None
