"""Label-free EM-RL on the embedded SmolLM2-135M-Instruct: a few GRPO / RLOO steps lower held-out token entropy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_entropy.evaluation.tasks import ArithmeticTask
from trl_entropy.ops import masked_sequence_reduce, token_entropy
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

pytestmark = pytest.mark.slow


@torch.no_grad()
def held_out_sequences(model, tokenizer, n: int = 8, max_new_tokens: int = 16):
    """Sampled completions of held-out prompts, fixed once, as (input_ids, attention_mask, completion_mask)."""
    prompts = [row["prompt"] for row in ArithmeticTask().dataset(n, "test", seed=7)]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    out = model.generate(
        **inputs, do_sample=True, temperature=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    completion = out[:, inputs["input_ids"].size(1) :]
    completion_mask = torch.ones_like(completion)
    attention = torch.cat([inputs["attention_mask"], completion_mask], dim=1)
    return out, attention, completion_mask


@torch.no_grad()
def mean_token_entropy(model, sequences) -> float:
    input_ids, attention, completion_mask = sequences
    width = completion_mask.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -width - 1 : -1]
    return masked_sequence_reduce(token_entropy(logits), completion_mask).mean().item()


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_label_free_steps_lower_held_out_entropy(tmp_path, default_model_path, method):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path)
    sequences = held_out_sequences(model, tokenizer)
    before = mean_token_entropy(model, sequences)

    config_class, trainer_class = {
        "grpo": (EntropyGRPOConfig, EntropyGRPOTrainer),
        "rloo": (EntropyRLOOConfig, EntropyRLOOTrainer),
    }[method]
    args = config_class(
        output_dir=str(tmp_path),
        entropy_reward="token",
        learning_rate=2e-5,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=4,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = trainer_class(
        model, args=args, train_dataset=ArithmeticTask().dataset(32, "train"), processing_class=tokenizer
    )
    trainer.train()
    after = mean_token_entropy(trainer.model, sequences)
    assert after < before, (before, after)
