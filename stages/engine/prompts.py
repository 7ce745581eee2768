"""Prompt templates (files in data/prompts/) and chat formatting.  docs/DESIGN.md 1.2."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

from stages.engine.io import DATA_DIR, InputError

PROMPTS_DIR = DATA_DIR / "prompts"

# Dataset instruction wrappers stripped from the retrieval query and from the problem text shown to the
# model (DAPO-Math's "Solve the following math problem ... Answer: $Answer" boilerplate and friends).
_WRAPPERS = [
    re.compile(r"^\s*Solve the following math problem step by step\.[^\n]*\n+", re.I),
    re.compile(r"\n+\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$", re.I),
    re.compile(r"\n+\s*Please reason step by step, and put your final answer within \\boxed\{\}\.?\s*$", re.I),
]


@lru_cache(maxsize=None)
def load_template(name: str) -> str:
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.exists():
        raise InputError(path, "prompt template not found")
    return path.read_text(encoding="utf-8").rstrip("\n")


def fill(template: str, **values: Any) -> str:
    """Replace ``{name}`` placeholders; other braces (``\\boxed{}``) are left alone."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", str(v))
    return out


def strip_wrappers(problem: str) -> str:
    text = problem
    for rx in _WRAPPERS:
        text = rx.sub("", text)
    return text.strip()


def student_prompt(problem: str) -> str:
    return fill(load_template("student"), problem=strip_wrappers(problem))


def teacher_prompt(problem: str, skill: Mapping[str, Any], mistake: Mapping[str, Any]) -> str:
    return fill(
        load_template("teacher"),
        problem=strip_wrappers(problem),
        skill_title=skill.get("title", ""),
        skill_principle=skill.get("principle", ""),
        skill_when_to_apply=skill.get("when_to_apply", ""),
        mistake_description=mistake.get("description", ""),
        mistake_how_to_avoid=mistake.get("how_to_avoid", ""),
    )


def opsd_teacher_prompt(problem: str, answer: str) -> str:
    return fill(load_template("opsd_teacher"), problem=strip_wrappers(problem), answer=answer)


def chat_prompt_ids(tokenizer, user_text: str, thinking: bool) -> list[int]:
    """Token ids of one user turn through the model's chat template, with the assistant header appended."""
    text = chat_prompt_text(tokenizer, user_text, thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt_text(tokenizer, user_text: str, thinking: bool) -> str:
    messages = [{"role": "user", "content": user_text}]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
    except TypeError:  # templates that do not take enable_thinking
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
