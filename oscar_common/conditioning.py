"""How OSCAR's images were conditioned, in one sentence, from a run config (its ``config.json`` form): for
``report.md`` and ``oscar-compare``'s ``compare.md``, so that a table of accuracies says what made them.

The class name in the ``pooled`` prompt is this project's addition (neither the paper nor the official code
conditions on it: docs/official-code.md), so the sentence says so and names the setting that leaves it out.
"""

from __future__ import annotations

from typing import Any, Mapping


def conditioning(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that say what conditioned the images (``prompt_template`` only for ``pooled``)."""
    pooled = config.get("scheme") == "pooled"
    return {"scheme": config.get("scheme"), "prompt_template": config.get("prompt-template") if pooled else None,
            "captioner": config.get("captioner"), "blip2_prompt": config.get("blip2-prompt")}


def conditioning_sentence(cond: Mapping[str, Any]) -> str:
    """``cond`` as :func:`conditioning` gives it, in words."""
    if cond["scheme"] == "pooled":
        how = f"scheme `pooled`, the prompt decoded from each class mean through the template " \
              f"`{cond['prompt_template']}`"
        if "{class_name}" in (cond["prompt_template"] or ""):
            how += (" (the class name in the prompt is this project's addition: neither the paper nor the official "
                    "code conditions on it; `prompt-template = \"{prompt}\"` leaves it out)")
    else:
        how = f"scheme `{cond['scheme']}`, the per-token caption mean itself, without the class name (as the " \
              "official code)"
    return f"Images conditioned on: {how}; captioner `{cond['captioner']}`."
