"""Vision-language models: the per-token signals and EM-FT's loss see the image, as TRL's own passes do.

A tiny random LLaVA (CLIP vision tower, Llama text model) and its processor are built offline; the references are
float64 recomputations with the image (and without it, to show the image matters)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from trainer_utils import TINY_KWARGS, RecordingReward, ScoringSourceMixin, SourceRecorder
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from trl_entropy.ops import token_entropy
from trl_entropy.testing import SPECIAL_TOKENS, WORDS
from trl_entropy.trainers import EMFTConfig, EMFTTrainer, EntropyGRPOConfig, EntropyGRPOTrainer

TEMPERATURE = 0.9
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}= {% endif %}"
)


def tiny_llava():
    """A random 2-layer LLaVA and its processor (each 28x28 image becomes 4 image tokens), with weights scaled up so
    that the next-token distribution is far from uniform and depends on the image."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS, IMAGE_TOKEN])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            max_position_embeddings=256,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.mul_(10)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model, processor


def image_dataset() -> Dataset:
    images = [Image.new("RGB", (28, 28), (60 * i, 30, 200 - 40 * i)) for i in range(4)]
    rows = []
    for i, image in enumerate(images):
        content = [{"type": "image"}, {"type": "text", "text": f"what is {i} ?"}]
        rows.append({"prompt": [{"role": "user", "content": content}], "image": image})
    return Dataset.from_list(rows)


@torch.no_grad()
def float64_entropies(model, processor, rows, completions, with_image: bool = True) -> list[torch.Tensor]:
    """Entropy at T of each completion token, float64, full logits, one sequence at a time."""
    reference = copy.deepcopy(model).double().eval()
    for module in reference.modules():  # TRL patches `forward` on the instance (fused head); run the plain one
        module.__dict__.pop("forward", None)
    out = []
    for row, completion in zip(rows, completions):
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        encoded = processor(text=[text], images=[row["image"]], return_tensors="pt")
        prompt_ids = encoded["input_ids"][0].tolist()  # image placeholders expanded, as TRL tokenizes
        ids = torch.tensor([prompt_ids + list(completion)])
        # Without the image: the same tokens, the placeholders embedded as plain tokens (no vision features).
        extra = {"pixel_values": encoded["pixel_values"].double()} if with_image else {}
        logits = reference(input_ids=ids, **extra).logits[0]
        start = len(prompt_ids) - 1
        out.append(token_entropy(logits[start : start + len(completion)], TEMPERATURE))
    return out


def _row_of(dataset: Dataset, prompt: list[dict]) -> dict:
    """The dataset row (prompt and image) of a prompt as TRL passed it."""
    text = prompt[0]["content"][-1]["text"]
    return next(row for row in dataset if row["prompt"][0]["content"][1]["text"] == text)


class SignalKeeper(TrainerCallback):
    """An observer keeping each batch's completions and token entropies."""

    requested_signals = ("token_entropy",)

    def __init__(self):
        self.batches = []

    def on_signals(self, signals, trainer):
        self.batches.append(signals)


def grpo_on_images(tmp_path, trainer_class, **extra):
    """An entropy-reward GRPO trainer on the tiny LLaVA (learning rate 0), with a recording reward and an observer
    of the signals' source: ``(trainer, model, processor, dataset, recorder, sources)``."""
    model, processor = tiny_llava()
    dataset = image_dataset()
    recorder, sources = RecordingReward(), SourceRecorder()
    args = EntropyGRPOConfig(
        output_dir=str(tmp_path),
        entropy_reward="token",
        reward_weights=[0.0],
        temperature=TEMPERATURE,
        **{**TINY_KWARGS, "learning_rate": 0.0, **extra},
    )
    trainer = trainer_class(
        model, reward_funcs=recorder, args=args, train_dataset=dataset, processing_class=processor, callbacks=[sources]
    )
    return trainer, model, processor, dataset, recorder, sources


def test_grpo_entropy_reward_sees_the_image(tmp_path):
    trainer, model, processor, dataset, recorder, sources = grpo_on_images(tmp_path, EntropyGRPOTrainer)
    trainer.train()
    assert sources.sources == ["generation"]
    rows = [_row_of(dataset, prompt) for prompt in recorder.prompts]
    got = list(trainer._logs["rewards"]["entropy_token"])[: len(rows)]
    with_image = [-h.mean().item() for h in float64_entropies(model, processor, rows, recorder.completion_ids)]
    text_only = [-h.mean().item() for h in float64_entropies(model, processor, rows, recorder.completion_ids, False)]
    assert got == pytest.approx(with_image, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(with_image, text_only)) > 1e-2


def test_emft_loss_is_the_entropy_with_the_image(tmp_path):
    """The code before this test left `pixel_values` out of EM-FT's loss pass: a text-only entropy."""
    model, processor = tiny_llava()
    dataset = image_dataset()
    keeper = SignalKeeper()
    kwargs = {k: v for k, v in TINY_KWARGS.items() if k != "num_generations"}
    args = EMFTConfig(
        output_dir=str(tmp_path),
        num_samples_per_prompt=2,
        temperature=TEMPERATURE,
        **{**kwargs, "learning_rate": 0.0},
    )
    trainer = EMFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor, callbacks=[keeper])
    trainer.train()
    (signals,) = keeper.batches
    rows = [_row_of(dataset, prompt) for prompt in trainer._logs["prompt"]]  # TRL's order: 2 samples of 2 prompts
    assert len(rows) == 4 and len({r["prompt"][0]["content"][1]["text"] for r in rows}) == 2
    logged = trainer.state.log_history[0]
    captured = torch.cat(signals.token_entropy).double()
    with_image = torch.cat(float64_entropies(model, processor, rows, signals.completion_ids)).double()
    text_only = torch.cat(float64_entropies(model, processor, rows, signals.completion_ids, False)).double()
    assert torch.allclose(captured, with_image, atol=1e-4)
    assert logged["loss"] == pytest.approx(with_image.mean().item(), abs=1e-4)
    assert abs(with_image.mean().item() - text_only.mean().item()) > 1e-2
    assert logged["emft/entropy_after"] == pytest.approx(logged["emft/entropy_before"], abs=1e-6)  # lr 0


class ScoringGRPOTrainer(ScoringSourceMixin, EntropyGRPOTrainer):
    pass


@pytest.mark.parametrize("extra,source", [({"num_iterations": 2}, "old_logps"), ({}, None)])
def test_signals_after_generation_read_trls_pass_with_the_image_or_refuse(tmp_path, extra, source):
    """A generator without logits (vLLM, tools): TRL's policy pass carries the image, so its values are read; with no
    such pass there are no image inputs to score with, and the trainer says so instead of scoring text only."""
    trainer, model, processor, dataset, recorder, sources = grpo_on_images(tmp_path, ScoringGRPOTrainer, **extra)
    if source is None:
        with pytest.raises(RuntimeError, match="multimodal completions from a generator that returns no logits"):
            trainer.train()
        return
    trainer.train()
    assert sources.sources == [source]
    rows = [_row_of(dataset, prompt) for prompt in recorder.prompts]
    got = list(trainer._logs["rewards"]["entropy_token"])[: len(rows)]
    expected = [-h.mean().item() for h in float64_entropies(model, processor, rows, recorder.completion_ids)]
    assert got == pytest.approx(expected, abs=1e-4)
