"""The study's small scored capability task: 40 "What is the capital of X?" questions, exact answers.

Why this task: SmolLM2-135M-Instruct answers most of them correctly (its arithmetic is near chance, so an arithmetic
probe could not show a loss), each answer is checked without a judge model (the capital's name, or an accepted
variant, appears in the answer, case-insensitively), and a model that collapses into refusals or repetition loses
them at once. Used as ``sirl eval capability --score-fn examples.cpu_study.capitals:score`` or through
``run_capability(score_fn=score)``.
"""

from __future__ import annotations

import json
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Egypt": "Cairo",
    "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "United Kingdom": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Thailand": "Bangkok", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Kenya": "Nairobi", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City",
    "Cuba": "Havana", "Australia": "Canberra", "India": "New Delhi", "Iran": "Tehran", "Turkey": "Ankara",
    "Ukraine": "Kyiv", "Czech Republic": "Prague", "Philippines": "Manila", "Vietnam": "Hanoi",
    "Saudi Arabia": "Riyadh", "Colombia": "Bogota",
}
VARIANTS = {"Kyiv": ("kyiv", "kiev"), "Bogota": ("bogota", "bogotá"), "New Delhi": ("new delhi", "delhi")}


def question(country: str) -> str:
    return f"What is the capital of {country}?"


ANSWERS = {question(c): a for c, a in CAPITALS.items()}


def correct(answer: str, response: str) -> bool:
    text = response.casefold()
    return any(v in text for v in VARIANTS.get(answer, (answer.casefold(),)))


def score(questions, responses) -> list[float | None]:
    """1.0 when the response names the capital, 0.0 otherwise, None for a question this task does not know."""
    return [None if q not in ANSWERS else float(correct(ANSWERS[q], r)) for q, r in zip(questions, responses)]


def write_questions(path: str | Path) -> Path:
    """The questions as a prompt file (``{"prompt": ...}`` per line) for ``sirl eval capability``."""
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in ANSWERS.items()))
    return path
