"""Prompt templates (files in data/prompts/) and chat formatting.  docs/DESIGN.md 1.2."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

from stages.engine.errors import InputError
from stages.engine.paths import DATA_DIR

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


# Lines of teacher.txt that the reference writes only when their field is non-empty
# (walawalagoose/SGSD skill/skill_memory.py:309-310, 319-322).
_OPTIONAL_FIELDS = ("skill_when_to_apply", "mistake_description", "mistake_how_to_avoid")


def teacher_prompt(problem: str, skill: Mapping[str, Any], mistake: Mapping[str, Any]) -> str:
    """The SGSD teacher's user turn: the reference's ``format_for_prompt`` guidance block for one
    (skill, mistake) pair, then ``Problem: ...`` and the instruction (skill/training.py:221-236,
    skill/sgsd_trainer.py:190-193)."""
    values = {
        "skill_title": str(skill.get("title", "") or "").strip(),
        "skill_principle": str(skill.get("principle", "") or "").strip(),
        "skill_when_to_apply": str(skill.get("when_to_apply", "") or "").strip(),
        "mistake_description": str(mistake.get("description", "") or "").strip(),
        "mistake_how_to_avoid": str(mistake.get("how_to_avoid", "") or "").strip(),
    }
    lines = [ln for ln in load_template("teacher").split("\n")
             if not any("{" + f + "}" in ln and not values[f] for f in _OPTIONAL_FIELDS)]
    return fill("\n".join(lines), problem=strip_wrappers(problem), **values)


def opsd_solution(answer: str) -> str:
    """The reference's teacher solution for answer-only data: "The answer is \\boxed{gold}." (a gold answer
    that already holds a \\boxed{} is kept as it is; data/dataset_adapter.py:171-191)."""
    a = str(answer).strip()
    return f"The answer is {a}." if "\\boxed" in a else f"The answer is \\boxed{{{a}}}."


def opsd_teacher_prompt(problem: str, answer: str) -> str:
    """The OPSD teacher's user turn: the reference-solution wrapper and transition text of
    data/data_collator.py:17-23, 64-70 around :func:`opsd_solution`."""
    return fill(load_template("opsd_teacher"), problem=strip_wrappers(problem), solution=opsd_solution(answer))


TEACHER_THINKING = ("on", "off", "rollout")


def teacher_thinking_flag(mode: str, rollout_thinking: bool) -> bool:
    """Thinking flag of a teacher prompt (SGSD and OPSD).  ``on``: the reference, which builds teacher prompts
    with enable_thinking=True while the student samples non-thinking (skill/sgsd_trainer.py:195-200,
    data/data_collator.py:72-77); ``off``; ``rollout``: the rollout's own flag."""
    if mode not in TEACHER_THINKING:
        raise InputError(None, f"teacher thinking must be one of {', '.join(TEACHER_THINKING)}, got '{mode}'")
    return bool(rollout_thinking) if mode == "rollout" else mode == "on"


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
