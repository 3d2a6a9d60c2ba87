"""selfdistill.rollout: the Rollouts value, EOS handling, the backend factory and the argument checks
both backends share."""

import copy

import pytest
import torch

from selfdistill.rollout import Rollouts, cut_at_eos, eos_token_ids, make_backend
from selfdistill.rollout.hf import HFBackend
from selfdistill.rollout.vllm import VLLMBackend


def test_cut_at_eos_keeps_the_eos_token():
    pad, eos = 0, [2, 7]
    tokens = torch.tensor(
        [
            [5, 2, 2, 2, 2],  # EOS at 1, then pad == eos
            [5, 6, 8, 9, 4],  # no EOS: truncated
            [7, 0, 0, 0, 0],  # the second eos id, right away
            [4, 4, 2, 3, 3],  # tokens after the EOS are dropped
        ]
    )
    ids, mask, lengths, truncated = cut_at_eos(tokens, eos, pad)
    assert lengths.tolist() == [2, 5, 1, 3]
    assert truncated.tolist() == [False, True, False, False]
    assert ids.tolist() == [[5, 2, 0, 0, 0], [5, 6, 8, 9, 4], [7, 0, 0, 0, 0], [4, 4, 2, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    # The width shrinks to the longest response.
    ids, mask, lengths, truncated = cut_at_eos(torch.tensor([[3, 2, 0, 0], [2, 0, 0, 0]]), [2], 0)
    assert ids.shape == mask.shape == (2, 2) and lengths.tolist() == [2, 1] and not truncated.any()


def test_eos_token_ids_merges_tokenizer_and_generation_config(tok, random_model):
    model = copy.deepcopy(random_model)
    assert eos_token_ids(tok, model) == [tok.eos_token_id]
    model.generation_config.eos_token_id = [7, tok.eos_token_id, 9]
    assert eos_token_ids(tok, model) == [tok.eos_token_id, 7, 9]


def test_rollouts_validates_shapes_and_moves():
    r = Rollouts(
        prompt_index=torch.tensor([0, 0]),
        prompt_lengths=torch.tensor([3, 3]),
        response_ids=torch.tensor([[4, 2], [5, 0]]),
        response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        lengths=torch.tensor([2, 1]),
        truncated=torch.tensor([False, True]),
        texts=["a", "b"],
    )
    moved = r.to("cpu")
    assert torch.equal(moved.response_ids, r.response_ids) and moved.texts == r.texts
    with pytest.raises(ValueError, match="response_mask"):
        Rollouts(**{**vars(r), "response_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="texts"):
        Rollouts(**{**vars(r), "texts": ["a"]})


def test_make_backend(tok, random_model):
    assert isinstance(make_backend("hf", random_model, tok, batch_size=4), HFBackend)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_backend("sglang", random_model, tok)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install selfdistill\[vllm\]"):
            make_backend("vllm", random_model, tok)
    else:  # vLLM generates from a folder or a vllm.LLM, never from an in-memory transformers model
        with pytest.raises(TypeError, match="model folder or a vllm.LLM"):
            make_backend("vllm", random_model, tok)


BAD_GENERATE_ARGS = [
    ({"prompt_ids": []}, "prompt_ids must be a non-empty list of non-empty token-id lists"),
    ({"prompt_ids": [[1], []]}, "prompt_ids must be a non-empty list of non-empty token-id lists"),
    ({"num_samples": 0}, r"need num_samples >= 1 and max_new_tokens >= 1, got 0, 4"),
    ({"max_new_tokens": 0}, r"need num_samples >= 1 and max_new_tokens >= 1, got 2, 0"),
    ({"temperature": -0.5}, r"need temperature >= 0 and 0 < top_p <= 1, got -0.5, 1.0"),
    ({"top_p": 0.0}, r"need temperature >= 0 and 0 < top_p <= 1, got 1.0, 0.0"),
    ({"top_p": 1.5}, r"need temperature >= 0 and 0 < top_p <= 1, got 1.0, 1.5"),
    ({"seed": [1, 2, 3]}, "got 3 seeds for 2 prompts"),
]


@pytest.mark.parametrize("bad,message", BAD_GENERATE_ARGS)
def test_both_backends_check_generate_arguments_alike(tok, random_model, bad, message):
    """One set of checks (`check_generate_args`) for every backend; the vLLM backend's run before vLLM is
    touched, so they are tested here without it (a backend object without its __init__)."""
    args = {"prompt_ids": [[1, 2], [3]], "num_samples": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4,
            "seed": 0, **bad}
    prompt_ids = args.pop("prompt_ids")
    for backend in (HFBackend(random_model, tok), object.__new__(VLLMBackend)):
        with pytest.raises(ValueError, match=f"^{message}$"):
            backend.generate(prompt_ids, **args)
