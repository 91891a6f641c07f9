"""Verifiable rewards for RLVR: GSM8K, MATH and IFEval checkers behind one registry.

    from tulu.verifiers import verify, verify_batch
    reward = args.verification_reward * verify("gsm8k", response, "#### 42")

Modules: `registry` (source names, `verify`, `verify_batch`), `gsm8k`, `math_verifier`
(+ `symbolic`, the timed math-verify worker), `ifeval` (+ `ifeval_checks`, the 25 IFEval
instruction checkers, `ifeval_tulu`, the Tulu 3 constraint form, and `text`,
sentence/word/language primitives).
"""

from tulu.verifiers.registry import (
    ALIASES,
    VERIFIERS,
    check_ground_truth,
    get_verifier,
    strip_chat_prompt,
    verify,
    verify_batch,
)

__all__ = ["ALIASES", "VERIFIERS", "check_ground_truth", "get_verifier", "strip_chat_prompt", "verify", "verify_batch"]
