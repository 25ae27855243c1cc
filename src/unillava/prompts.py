"""The prompt strings the LLaVA family's data and benchmarks use, in one place.

Response-format prompts are LLaVA-1.5's ("Improved Baselines with Visual Instruction Tuning", Liu et al.
2023; github.com/haotian-liu/LLaVA: its `llava_v1_5_mix665k` training data and `playground/data/eval`
question files): the line after a question that asks for a short answer or an option's letter. They are
stored without the separating "\\n"; callers add it ("question\\n" + prompt), as LLaVA's files do.

The segmentation prompts are OMG-LLaVA's ("OMG-LLaVA: Bridging Image-level, Object-level, Pixel-level
Reasoning and Understanding", Zhang et al. 2024; github.com/lxtGH/OMG-Seg, `omg_llava/`), which takes its
grounded-caption prompt from GLaMM; the REC prompt is LLaVA-1.5's RefCOCO instruction, which ConvLLaVA
also evaluates with. Templates name their placeholder: `REFSEG_PROMPT.format(expression=...)`.

This module is a leaf: it imports nothing from unillava.
"""

from __future__ import annotations

# LLaVA-1.5's response-format prompts.
PROMPT_SHORT = "Answer the question using a single word or phrase."
PROMPT_LETTER = "Answer with the option's letter from the given choices directly."
PROMPT_LETTER_CN = "请直接回答选项字母。"  # MMBench-CN's
PROMPT_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."

# `data.response_format` (training) and `apply_response_format`: name -> prompt.
RESPONSE_FORMATS: dict[str, str] = {
    "short": PROMPT_SHORT,
    "option": PROMPT_LETTER,
    "unanswerable": PROMPT_UNANSWERABLE,
}

# OMG-LLaVA's (and, for REC, LLaVA-1.5's) grounding prompts.
REFSEG_PROMPT = "Please segment {expression} in this image."
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
GCG_PROMPT = (
    "Could you please give me a detailed description of the image? Please respond with interleaved "
    "segmentation masks for the corresponding parts of the answer."
)
REGION_CAPTION_PROMPT = (
    "Can you provide me with a detailed description of the region in the picture marked by {region}?"
)

__all__ = [
    "GCG_PROMPT",
    "PROMPT_LETTER",
    "PROMPT_LETTER_CN",
    "PROMPT_SHORT",
    "PROMPT_UNANSWERABLE",
    "REC_PROMPT",
    "REFSEG_PROMPT",
    "REGION_CAPTION_PROMPT",
    "RESPONSE_FORMATS",
]
