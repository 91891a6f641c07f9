"""Source name -> checker; `verify` and `verify_batch`, the entry points RLVR calls.

Tulu 3's RLVR rows carry a `dataset` column (`gsm8k`, `MATH`, `ifeval`) and a
`ground_truth` column; open-instruct (`model_utils.apply_verifiable_reward`, e363290be)
looks the checker up by the lower-cased name and pays `--verification_reward` (10) for a
verified answer. Here each checker returns a score in [0, 1] and the RL script
multiplies it by that flag.

- `verify(source, response, ground_truth)`: an unknown source raises KeyError listing
  the known names; a None ground truth scores 0; a malformed one raises ValueError.
- `verify_batch(sources, responses, ground_truths)`: the same, over a rollout batch.
- `check_ground_truth(source, ground_truth)`: those errors up front (RLVR checks every row when it
  loads its data, so no run dies at the step that first draws a bad row).
Both are safe to call from any thread: the checkers are pure functions of their
inputs, and the one stateful piece (the symbolic-math worker process) is serialized
by its own lock and bounded by its own timeout.

The original scored `model_output.split("<|assistant|>\\n")[-1].strip()`, the decoded
prompt+response. Our RL script passes the response alone; `strip_chat_prompt` is there for
callers that hold the whole decoded sequence.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tulu.verifiers.gsm8k import verify_gsm8k
from tulu.verifiers.ifeval import verify_ifeval, verify_ifeval_loose
from tulu.verifiers.math_verifier import verify_math, verify_math_strict

Verifier = Callable[[str, object], float]

VERIFIERS: dict[str, Verifier] = {
    "gsm8k": verify_gsm8k,
    "math": verify_math,
    "math_strict": verify_math_strict,
    "ifeval": verify_ifeval,
    "ifeval_loose": verify_ifeval_loose,
}

ALIASES: dict[str, str] = {
    "gsm": "gsm8k",
    "openai/gsm8k": "gsm8k",
    "hendrycks_math": "math",
    "minerva_math": "math",
    "math500": "math",
    "math-500": "math",
    "strict_math": "math_strict",
    "if": "ifeval",
    "google/ifeval": "ifeval",
    "if_functions": "ifeval",
}

ASSISTANT_TAG = "<|assistant|>\n"


def strip_chat_prompt(text: str) -> str:
    """The text after the last tulu-template assistant tag, stripped (as the original)."""
    return text.rsplit(ASSISTANT_TAG, 1)[-1].strip() if ASSISTANT_TAG in text else text


def get_verifier(source: str) -> Verifier:
    """The checker for a dataset source name (case-insensitive, aliases allowed)."""
    name = str(source).strip().lower()
    name = ALIASES.get(name, name)
    if name not in VERIFIERS:
        known = sorted(set(VERIFIERS) | set(ALIASES))
        raise KeyError(f"no verifier for source {source!r}; known sources: {known}")
    return VERIFIERS[name]


def verify(source: str, response: str, ground_truth) -> float:
    """Score in [0, 1] of `response` against `ground_truth` for a dataset `source`."""
    fn = get_verifier(source)
    if ground_truth is None or response is None:
        return 0.0
    return float(fn(str(response), ground_truth))


def check_ground_truth(source: str, ground_truth) -> None:
    """Raise now what `verify` would raise mid-run: KeyError for an unknown source, ValueError for a
    malformed ground truth. Scoring an empty response parses the ground truth and runs no checker."""
    get_verifier(source)("", ground_truth)


def verify_batch(
    sources: Sequence[str], responses: Sequence[str], ground_truths: Sequence
) -> list[float]:
    """`verify` over a batch (equal-length sequences), in order."""
    if not (len(sources) == len(responses) == len(ground_truths)):
        raise ValueError(
            f"verify_batch needs equal lengths, got {len(sources)}, {len(responses)}, {len(ground_truths)}"
        )
    return [verify(s, r, g) for s, r, g in zip(sources, responses, ground_truths)]
