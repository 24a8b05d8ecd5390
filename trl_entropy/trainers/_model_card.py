"""Model cards of the entropy trainers: TRL's card (its template, through ``trl.trainer.utils.generate_model_card``)
naming the base model, the entropy method with its settings, the papers as BibTeX and a ``trl-entropy`` tag.

TRL's own card reads "fine-tuned version of [None]" for a model loaded from a local folder (the embedded SmolLM2 is
one), ``pipeline(model="None")`` in its usage snippet when the model is not pushed to the Hub, and "trained with GRPO",
with no word of the entropy method; the trainers get this card through the one overridden method of
:class:`EntropyModelCardMixin`.

``base_model`` in the card's YAML header is a Hub model id or absent: the Hub refuses a push whose model card names
anything else there (a local path is "not valid"). A local folder whose Hub id is known gets it (the embedded models,
a folder of the Hub's download cache); any other local folder is named in the card's text.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from trl.trainer.utils import generate_model_card, get_config_model_id

__all__ = ["EntropyModelCardMixin", "PAPERS", "base_model_id", "entropy_method_settings"]

# The embedded models (``trl_entropy.models``) are these hub models, converted into local folders of these names.
_EMBEDDED_HUB_IDS = {
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}

# docstyle-ignore
PAPERS = {
    "em": (
        "The Unreasonable Effectiveness of Entropy Minimization in LLM Reasoning",
        "2505.15134",
        textwrap.dedent("""\
            @article{agarwal2025unreasonable,
                title        = {{The Unreasonable Effectiveness of Entropy Minimization in LLM Reasoning}},
                author       = {Shivam Agarwal and Zimin Zhang and Lifan Yuan and Jiawei Han and Hao Peng},
                year         = 2025,
                eprint       = {arXiv:2505.15134},
            }"""),
    ),
    "forking": (
        "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning",
        "2506.01939",
        textwrap.dedent("""\
            @article{wang2025beyond,
                title        = {{Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
                                Learning for LLM Reasoning}},
                author       = {Shenzhi Wang and others},
                year         = 2025,
                eprint       = {arXiv:2506.01939},
            }"""),
    ),
    "self_certainty": (
        "Learning to Reason without External Rewards",
        "2505.19590",
        textwrap.dedent("""\
            @article{zhao2025learning,
                title        = {{Learning to Reason without External Rewards}},
                author       = {Xuandong Zhao and others},
                year         = 2025,
                eprint       = {arXiv:2505.19590},
            }"""),
    ),
}


def base_model_id(model: Any) -> str | None:
    """Hub id of the model that was fine-tuned: the config's ``_name_or_path`` when it is a hub id; for a local
    folder, the hub id of an embedded model's converted folder or of a snapshot in the Hub's download cache
    (``.../models--org--name/snapshots/<revision>``); else ``None`` (another local folder)."""
    name = get_config_model_id(model.config)
    if not name:
        return None
    if os.path.isdir(name):
        path = Path(name).resolve()
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return _EMBEDDED_HUB_IDS.get(path.name)
    return name


def entropy_method_settings(args: Any, trainer_name: str) -> tuple[str, list[tuple[str, Any]], list[str]]:
    """``(method, settings, paper keys)`` of a training config: a one-line name of the method, the config fields that
    define it, and the :data:`PAPERS` it follows."""
    if trainer_name == "EM-FT":
        fields = ("num_samples_per_prompt", "entropy_normalization", "entropy_floor", "temperature", "learning_rate")
        return "EM-FT (entropy minimisation on the model's own samples)", _settings(args, fields), ["em"]
    parts, papers, fields = [], [], []
    reward = getattr(args, "entropy_reward", "none")
    if reward != "none":
        parts.append(f"EM-RL with the `{reward}` entropy reward")
        papers.append("self_certainty" if reward == "self_certainty" else "em")
        fields += ["entropy_reward", "entropy_reward_weight", "temperature", "beta"]
    if getattr(args, "forking_tokens_enabled", False):
        parts.append(f"forking tokens (policy gradient on the top {args.forking_token_ratio:g} entropy tokens)")
        papers.append("forking")
        fields += ["forking_token_ratio", "forking_token_mode", "forking_token_scope", "forking_token_normalization"]
    elif getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        parts.append(f"TRL's top-entropy-quantile mask ({args.top_entropy_quantile:g})")
        papers.append("forking")
        fields += ["top_entropy_quantile"]
    method = " and ".join(parts) if parts else "no entropy method (plain TRL objective)"
    fields += ["loss_type", "num_generations", "learning_rate"]
    return method, _settings(args, fields), papers


def _tracker_urls() -> tuple[str | None, str | None, str | None]:
    """The W&B run, Trackio space and Comet experiment URLs, found as TRL's own card finds them."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    wandb_url = None
    if is_wandb_available():
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    return wandb_url, get_trackio_space_url(), get_comet_experiment_url()


def _settings(args: Any, fields: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    return [(name, getattr(args, name)) for name in dict.fromkeys(fields) if hasattr(args, name)]


class EntropyModelCardMixin:
    """Gives a TRL trainer the entropy model card: overrides only ``create_model_card`` (same signature)."""

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` to ``args.output_dir``: TRL's card plus the base model, the entropy method and its
        settings, the papers (BibTeX) and the ``trl-entropy`` tag. Only on the main process."""
        if not self.is_world_process_zero():
            return
        trl_name = getattr(self, "_trl_name", "") or self._name
        method, settings, paper_keys = entropy_method_settings(self.args, self._name)
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        tags.update(["trl-entropy", "entropy-minimization"])
        if "forking" in paper_keys:
            tags.add("forking-tokens")
        if dataset_name is not None and (os.path.exists(dataset_name) or "/" not in dataset_name):
            dataset_name = None  # a local file or a built-in task is not a hub dataset to link to
        base_model = base_model_id(self.model)
        main_paper = PAPERS[paper_keys[0]] if paper_keys else None
        citations = [PAPERS[key][2] for key in dict.fromkeys(paper_keys)]
        trainer_paper = getattr(self, "_paper", {})
        if trainer_paper.get("id") not in {PAPERS[key][1] for key in paper_keys}:  # EM-FT's paper is the EM paper
            citations.append(textwrap.dedent(trainer_paper.get("citation", "")).strip())
        wandb_url, trackio_url, comet_url = _tracker_urls()
        if trackio_url is not None:
            tags.add(f"trackio:{trackio_url}")
        card = generate_model_card(
            base_model=base_model,
            model_name=model_name or Path(self.args.output_dir).name,
            # TRL's snippet loads `hub_model_id`; a model that is not on the Hub loads from its output folder
            hub_model_id=self.hub_model_id or self.args.output_dir,
            dataset_name=dataset_name,
            tags=sorted(tags),
            wandb_url=wandb_url,
            trackio_url=trackio_url,
            comet_url=comet_url,
            trainer_name=f"{trl_name} with {method}" if trl_name != "EM-FT" else method,
            trainer_citation="\n\n".join(c for c in citations if c),
            paper_title=main_paper[0] if main_paper else None,
            paper_id=main_paper[1] if main_paper else None,
        )
        text = card.text
        if base_model is None:
            local = get_config_model_id(self.model.config) or "a local model"
            text = text.replace("[None](https://huggingface.co/None)", f"the local model `{local}`")
        if not self.hub_model_id:
            where = (
                f"The model is not on the Hub: load it from the folder it was saved to, `{self.args.output_dir}` "
                "(after `push_to_hub`, from its Hub id).\n\n"
            )
            text = text.replace("## Quick start\n\n", "## Quick start\n\n" + where, 1)
        rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in settings)
        # The method itself is named in TRL's "Training procedure" sentence above: this section adds the class and
        # the settings only.
        section = (
            "## Entropy method\n\n"
            f"Trained with trl-entropy's `{type(self).__name__}`, with these settings:\n\n"
            f"| setting | value |\n|---|---|\n{rows}\n\n"
        )
        text = text.replace("### Framework versions", section + "### Framework versions", 1)
        card.text = text
        card.save(os.path.join(self.args.output_dir, "README.md"))
