"""Benchmark: speed of the offline benchmark scorers (bench_scoring) on CPU, each against a
reference run in the same process on the same answers.

    python -m bench.bench_scoring                 # 4000 answers per scorer (IFEval 400), best of 3
    python -m bench.bench_scoring --n 1000 --repeats 5

References: the MCQ and BBH extractors against the official code's loop shape (each template filled
in anew for every answer; ours fills them in once at import), the AdvBench refusal test against one
compiled regular expression over the same phrases, IFEval strict + loose against strict alone (loose
tries 8 readings of every answer), the AIR letter rule against evaluate.parse_option (the lenient
parser of the `mcq` task). Every pair must agree answer for answer where it claims to (checked).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import evaluate as ev
from paper_benchmarks import bench_rules as R
from paper_benchmarks import bench_scoring as S
from support import checks

FILLER = (
    "let me think about this question step by step before I answer it properly",
    "the speaker asks about the capital city of a large european country",
    "considering the options given in the recording there is one clear choice",
)


def mcq_answers(n: int, rng: random.Random) -> list[str]:
    forms = [
        "The answer is {L}.",
        "{l}",
        "{L}) something",
        "I would choose option {L} because {f}.",
        "{f}. Therefore, the correct answer is ({L}).",
        "答案是{L}",
        "{f}, {f}. I don't know.",
    ]
    return [
        rng.choice(forms).format(L=rng.choice("ABCD"), l=rng.choice("abcd"), f=rng.choice(FILLER))
        for _ in range(n)
    ]


def bbh_rows(n: int, rng: random.Random) -> list[tuple[str, str]]:
    forms = {
        "sports_understanding": ["Yes, the sentence is plausible.", "{f}. So the answer is no."],
        "hyperbaton": ["The answer is (B).", "{f}. Option A has the correct adjective order.", "b"],
        "navigate": ["No, you do not return to the starting point.", "{f}. Yes."],
        "web_of_lies": ["So the answer is: Sherrie tells the truth.", "{f}. Hmm."],
    }
    rows = []
    for i in range(n):
        task = rng.choice(list(forms))
        rows.append((rng.choice(forms[task]).format(f=rng.choice(FILLER)), f"bbh_{task}_{i}"))
    return rows


def adv_answers(n: int, rng: random.Random) -> list[str]:
    forms = [
        "I'm sorry, but I can't help with that. {f}.",
        "Sure! First, {f}. Then {f}.",
        "{f}. That would be illegal.",
        "Step 1: {f}. Step 2: {f}.",
    ]
    return [rng.choice(forms).format(f=rng.choice(FILLER)) for _ in range(n)]


def ifeval_rows(n: int, rng: random.Random) -> list[dict]:
    ids = [
        ("punctuation:no_comma", {}),
        ("keywords:existence", {"keywords": ["capital"]}),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}),
        ("detectable_format:title", {}),
        ("change_case:english_capital", {}),
    ]
    rows = []
    for i in range(n):
        chosen = rng.sample(ids, 2)
        text = "\n".join(rng.choice(FILLER) for _ in range(3))
        rows.append(
            {
                "prompt": f"prompt {i}",
                "instruction_id_list": [c[0] for c in chosen],
                "kwargs": [c[1] for c in chosen],
                "response": f"<<Title>>\n{text}\nAny other questions?",
            }
        )
    return rows


def official_form_mcq(response: str) -> str | None:
    """The official loop shape: every template filled in with every letter for every answer."""
    text = response.lower()
    if text[:3] in ("<1>", "<2>", "<3>"):
        text = text[3:].strip()
    for template in R.MCQ_TEMPLATES:
        for letter in "abcd":
            if template.replace("X", letter) in text:
                return letter.upper()
    for letter in "abcd":
        if text == letter or any(text.startswith(letter + p) for p in ".,:)"):
            return letter.upper()
    return next((x for phrase, x in R.MCQ_LAST_RESORT if phrase in text), None)


def official_form_bbh(response: str, item_id: str) -> int | None:
    """bbh_extract with the hyperbaton templates filled in anew for every answer."""
    if "hyperbaton" not in item_id:
        return S.bbh_extract(response, item_id)
    text = S.bbh_normalize(response)
    if text in ("a", "b"):
        return 0
    for entry in R.HYPERBATON:
        pairs = (
            [entry]
            if isinstance(entry, tuple)
            else [(entry.replace("X", "a"), 0), (entry.replace("X", "b"), 1)]
        )
        for phrase, value in pairs:
            if phrase in text:
                return value
    return S._hyperbaton(text)


REFUSAL_REGEX = re.compile("|".join(re.escape(s.lower()) for s in R.REFUSALS))


def regex_refusal(response: str) -> bool:
    return not response.strip() or REFUSAL_REGEX.search(response.lower()) is not None


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def punkt_folder() -> str:
    """IFEval imports NLTK's punkt_tab; an empty one will do for timing when none is installed."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return ""
    except LookupError:
        root = tempfile.mkdtemp(prefix="nltk_")
        folder = Path(root) / "tokenizers" / "punkt_tab" / "english"
        folder.mkdir(parents=True)
        for name in (
            "abbrev_types.txt",
            "collocations.tab",
            "sent_starters.txt",
            "ortho_context.tab",
        ):
            (folder / name).write_text("")
        nltk.data.path.insert(0, root)
        return " (empty punkt_tab: none installed)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rng = random.Random(0)
    mcq, bbh, adv = mcq_answers(args.n, rng), bbh_rows(args.n, rng), adv_answers(args.n, rng)
    ife = ifeval_rows(max(args.n // 10, 10), rng)
    air = [
        rng.choice(["B", "The answer is C.", "As a listener, A.", "female", "(D)"])
        for _ in range(args.n)
    ]
    choices = ["male", "female", "child", "senior"]
    note = punkt_folder()
    registry = S.ifeval_registry()

    def ifeval_strict():
        return [S.ifeval_follows(registry, r, r["response"], loose=False) for r in ife]

    pairs = [
        (
            "MMSU/OBQA letter (mcq_extract)",
            len(mcq),
            lambda: [S.mcq_extract(a) for a in mcq],
            "official loop shape",
            lambda: [official_form_mcq(a) for a in mcq],
            True,
        ),
        (
            "BBH routing (bbh_extract)",
            len(bbh),
            lambda: [S.bbh_extract(a, i) for a, i in bbh],
            "official loop shape",
            lambda: [official_form_bbh(a, i) for a, i in bbh],
            True,
        ),
        (
            "AdvBench refusal (is_refusal)",
            len(adv),
            lambda: [S.is_refusal(a) for a in adv],
            "one compiled regex",
            lambda: [regex_refusal(a) for a in adv],
            True,
        ),
        (
            "IFEval strict+loose (score_ifeval)",
            len(ife),
            lambda: S.score_ifeval(ife),
            "strict only",
            ifeval_strict,
            False,
        ),
        (
            "AIR letter (air_letter)",
            len(air),
            lambda: [S.air_letter(a) for a in air],
            "evaluate.parse_option",
            lambda: [ev.parse_option(a, choices) for a in air],
            False,
        ),
    ]
    cpu = platform.processor() or platform.machine()
    print(
        f"{datetime.date.today()}, {platform.python_version()}, {cpu}, {os.cpu_count()} cores; "
        f"best of {args.repeats}{note}\n"
    )
    print("| scorer | answers | ms | answers / s | reference | ref ms | ref time / ours | agree |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for name, n, ours, ref_name, ref, same in pairs:
        t, out = best_of(args.repeats, ours)
        t_ref, out_ref = best_of(args.repeats, ref)
        agree = ("yes" if out == out_ref else "NO") if same else "-"
        print(
            f"| {name} | {n} | {1000 * t:.1f} | {n / t:,.0f} | {ref_name} | {1000 * t_ref:.1f} | "
            f"{t_ref / t:.2f}x | {agree} |"
        )


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
