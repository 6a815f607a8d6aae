"""generation.compile_decoding: the compiled one-token step computes what the eager step does,
at every position, for a padded batch with a prompt method and for packed weights, and one
graph serves every cache length; a weight changed after packing sends decoding back to the
eager step, which notices the change."""
import pytest
import torch
from torch._dynamo.utils import counters

from minipt.generation import compile_decoding, decode_steps, generate, stepwise_logits
from minipt.packed import pack_for_decoding
from minipt.prompts import PromptConfig, attach

from test_packed import bf16_close, q4_1_gpt


def count_compiled_calls(model) -> list:
    """Wrap model.compiled_step so that each call appends to the returned list."""
    calls, step = [], model.compiled_step
    model.compiled_step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
    return calls


def test_compiled_packed_step_matches_the_eager_one_and_a_changed_weight_is_noticed():
    model = q4_1_gpt()                                                # its 128-row head packs too
    assert pack_for_decoding(model) == 2 * 7 + 1
    ids = torch.randint(0, 128, (24,)).tolist()
    eager = stepwise_logits(model, ids)
    calls = count_compiled_calls(compile_decoding(model))
    bf16_close(stepwise_logits(model, ids), eager)                    # compiled: rounding may differ
    assert len(calls) == len(ids) - 1                                 # every step after the first
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(2)                  # e.g. a LoRA merged after packing
    changed = stepwise_logits(model, ids)
    # the compiled step would use the old codes
    assert len(calls) == len(ids) - 1
    del model.compiled_step
    assert torch.equal(changed, stepwise_logits(model, ids))
    assert not torch.allclose(changed, eager, atol=1e-3)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_compiled_decoding_gives_the_eager_tokens(method):
    """fp32 (not packed), a left-padded batch: the graph's dynamic positions, mask and prompt
    must be right."""
    model = attach(q4_1_gpt(), PromptConfig.for_method(method, num_virtual_tokens=3, init="random", seed=0,
                                            projection_hidden=16)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12]]
    eager = generate(model, prompts, 16, pad_id=0)
    served = list(decode_steps(model, prompts, 16, pad_id=0))
    calls = count_compiled_calls(compile_decoding(model))
    assert generate(model, prompts, 16, pad_id=0) == eager
    assert list(decode_steps(model, prompts, 16, pad_id=0)) == served
    assert len(calls) == 2 * 15
    generate(model, [[1, 2]], 4)                                      # one row: compiled once more
    graphs = counters["stats"]["unique_graphs"]
    generate(model, [[3, 4, 5, 6, 7]], 9)                             # other lengths, other cache sizes:
    assert counters["stats"]["unique_graphs"] == graphs               # the same graph

