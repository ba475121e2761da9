"""How the answers changed in words: per run, for the base's and the policy's sampled answers, the
mean count of "I'm" per answer and the share of answers that say "sorry" or "afraid" (the
apologetic register of the chosen answers in HH-RLHF's harmless pairs), next to the report's
repeated-3-gram rate. Reads evaluate.py dpo's generations.json; prints a markdown table.

    python experiments/answer_phrases.py RUN/eval/NAME/dpo/generations.json ... > phrases.md
"""
import json
import re
import sys
from pathlib import Path

I_AM = re.compile(r"\bI['’]m\b")
APOLOGY = re.compile(r"sorry|afraid", re.IGNORECASE)


def answers(generations: list, side: str) -> list[str]:
    return [sample["response"] for prompt in generations for sample in prompt[side]["samples"]]


def main(paths: list[str]) -> None:
    print("| run | model | answers | \"I'm\" per answer | share with sorry/afraid |")
    print("|---|---|---|---|---|")
    for path in paths:
        generations = json.loads(Path(path).read_text())
        run = Path(path).parent.parent.name
        for side in ("base", "policy"):
            texts = answers(generations, side)
            i_am = sum(len(I_AM.findall(t)) for t in texts) / len(texts)
            apology = sum(bool(APOLOGY.search(t)) for t in texts) / len(texts)
            print(f"| {run} | {side} | {len(texts)} | {i_am:.2f} | {apology:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
