"""The embedded instruction world: tasks with computable answers, controlled mistakes, a
rule-based scorer of the five HelpSteer2 attributes — alignment judged by ground truth.

Task families (the answer is computed, never sampled):

==========  =====================================================  ==================
family      prompt                                                 answer
==========  =====================================================  ==================
add         ``What is 23 plus 58?``                                ``81``
sort        ``Sort from smallest to largest: 7, 2, 9.``            ``2, 7, 9``
reverse     ``Reverse the word apple.``                            ``elppa``
count       ``How many times does the letter p appear in apple?``  ``2``
==========  =====================================================  ==================

Responses: ``clean`` (``The answer is X.``), ``shown`` (one sentence of work, then the
answer), and corruptions of the correct answer: ``wrong`` (a changed digit / item /
letter), ``missing`` (an item, digit or letter left out), ``extra`` (one added),
``filler`` (filler words before the answer), ``repetition`` (the answer sentence three
times), ``truncation`` (cut before the answer), ``off_topic`` (an unrelated sentence).

Steerable styles: correct answers whose verbosity and complexity span the whole 0..4
scale and vary independently (in the SFT and reward-model data only with
``synthesize(..., styles="steerable")``; docs/steerlm.md). Complexity (cx) and verbosity
(vb) by the scorer below:

============  ==============================================================  ===  ======
style         response                                                        cx   vb
============  ==============================================================  ===  ======
bare          the answer alone: ``81.``                                       0    0
polite_bare   1 to 3 courteous sentences around the bare answer               0    2..4
polite        1 to 3 courteous sentences around ``The answer is X.``          1    2..4
polite_shown  courteous sentences around one sentence of work and the answer  2    3..4
detailed      two sentences of work, then the answer                          3    2..3
stepwise      three sentences of work, then the answer                        4    2..4
============  ==============================================================  ===  ======

Scorer (:func:`score_response`, any (prompt meta, response) pair):

- a bare answer (a sentence ``X.``, X lowercase words or numbers separated by ``, ``,
  alone or among courteous sentences, i.e. with a word of ``COURTEOUS``) states the
  answer X: correctness as below, coherence 4, complexity 0, verbosity 0 alone, else by
  the word count below;
- correctness: 4 if the stated answer (the last ``The answer is X.``) equals the true one,
  1 if it is one edit away (an item / digit / letter missing, extra or changed in a list
  or word, or a count off by one), else 0 (including no stated answer);
- coherence: 4, minus 1 for filler words, minus 2 for a repeated sentence; 1 if the
  response stops without a stated answer; 0 if it is off topic;
- complexity: 1 + the number of sentences of work before the (last) stated answer, at
  most 4 (a sentence of work: any sentence there but an answer sentence, a filler one
  (``Well,``, ``Hmm,``, ``Okay,``) and a courteous one (a word of ``COURTEOUS`` in it):
  shown work gives 2); 1 without a stated answer, 0 off topic;
- verbosity: words <= 6: 1, <= 12: 2, <= 20: 3, else 4;
- helpfulness = floor((2 correctness + coherence + 4 - 2 max(0, verbosity - 2)) / 4),
  clipped to 0..4: clean, bare and shown-work answers 4 (3 when long, verbosity 3 or 4),
  filler and repetition 3, one-edit and wrong answers 2, truncated and off-topic
  responses 1.

:func:`synthesize` writes (deterministic by seed: same seed, same bytes) SFT conversations
(``flawed_share`` of them with a corrupted response, so SFT learns mistakes alignment
can remove), HelpSteer2 regression rows (two responses per prompt), HelpSteer2-Preference
pairs (strength = helpfulness difference, clipped to -3..3), prompt files (train and
held out), a RewardBench-format file with subsets ``world-easy`` (clean vs truncated /
off-topic) and ``world-hard`` (clean vs filler / repetition / one-edit), and a SentencePiece
tokenizer trained on all of it. ``styles="steerable"`` adds the steerable styles to the SFT
conversations' good responses and to the regression and pair rows' styles; the default,
``"standard"``, writes the world every published figure was measured on, byte for byte.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, List, Sequence

from aligner.data.loading import load_dataset
from aligner.data.tokenizer import train_sentencepiece
from aligner.files import write_jsonl

FAMILIES = ("add", "sort", "reverse", "count")
CORRUPTIONS = ("wrong", "missing", "extra", "filler", "repetition", "truncation", "off_topic")
STYLES = ("clean", "shown") + CORRUPTIONS
STEERABLE = ("bare", "polite_bare", "polite", "polite_shown", "detailed", "stepwise")
# per style set: the good styles of SFT conversations, and the styles of regression / pair rows
STYLE_SETS = {"standard": (("clean", "shown"), STYLES),
              "steerable": (("clean", "shown") + STEERABLE, STYLES + STEERABLE)}
SYSTEM = "Answer the question."
WORDS = ("apple", "banana", "river", "garden", "pepper", "rabbit", "yellow", "summer", "letter", "kitten",
         "button", "coffee", "mirror", "puzzle", "window", "butter", "cotton", "ladder", "hammer", "carrot")
OFF_TOPIC = ("I enjoy long walks in the park.", "The weather is nice today.", "My favourite colour is green.",
             "Cats like to sleep in the sun.")
FILLERS = ("Well, let me see, okay.", "Hmm, so, basically, right.", "Okay, um, well, so.")
# courteous sentences: no task word, no filler word, no single letter (the count family's
# letters); a sentence with a COURTEOUS word is never work
COURTEOUS = ("happy", "help", "helps", "thanks", "thank", "question", "hope", "free", "reply")
OPENERS = ("Sure, I am happy to help with that.", "Thanks for the question, here is my reply.",
           "Good question, let me work it out.")
CLOSERS = ("I hope this helps you.", "Feel free to ask me another question.", "Thank you for asking, have fun.")
FILLER_WORDS = ("Well,", "Hmm,", "Okay,", " um,", "basically")
HESITATIONS = FILLER_WORDS[:3]  # a sentence with one is filler, not work
ANSWER = re.compile(r"The answer is ([^.]*)\.")
BARE = re.compile(r"([0-9a-z]+(?:, [0-9a-z]+)*)\.")  # a sentence that is the answer alone


# ------------------------------------------------------------------------------ tasks
def make_task(rng: random.Random, family: str) -> dict:
    if family == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"family": family, "prompt": f"What is {a} plus {b}?", "answer": str(a + b), "args": [a, b]}
    if family == "sort":
        xs = rng.sample(range(1, 30), rng.randint(3, 5))
        return {"family": family, "prompt": f"Sort from smallest to largest: {', '.join(map(str, xs))}.",
                "answer": ", ".join(map(str, sorted(xs))), "args": xs}
    if family == "reverse":
        w = rng.choice(WORDS)
        return {"family": family, "prompt": f"Reverse the word {w}.", "answer": w[::-1], "args": [w]}
    w = rng.choice(WORDS)
    c = rng.choice(sorted(set(w)))
    return {"family": "count", "prompt": f"How many times does the letter {c} appear in {w}?",
            "answer": str(w.count(c)), "args": [c, w]}


def _edit(rng: random.Random, task: dict, kind: str) -> str:
    """The answer with one controlled mistake (wrong / missing / extra)."""
    fam, ans = task["family"], task["answer"]
    if fam == "sort":
        items = ans.split(", ")
        if kind == "missing":
            del items[rng.randrange(len(items))]
        elif kind == "extra":
            items.insert(rng.randrange(len(items) + 1), str(rng.randint(1, 29)))
        else:
            i = rng.randrange(len(items) - 1)
            items[i], items[i + 1] = items[i + 1], items[i]
        return ", ".join(items)
    if fam == "reverse":
        chars = list(ans)
        i = rng.randrange(len(chars))
        if kind == "missing":
            del chars[i]
        elif kind == "extra":
            chars.insert(i, rng.choice("aeiou"))
        else:
            chars[i] = rng.choice([c for c in "bcdfgklmnprst" if c != chars[i]])
        return "".join(chars)
    if fam == "count":
        n = int(ans)
        return str(n + 1 if kind != "missing" or n == 0 else n - 1)
    # add
    if kind == "missing" and len(ans) > 1:
        i = rng.randrange(len(ans))
        return ans[:i] + ans[i + 1:]
    if kind == "extra":
        return ans + str(rng.randint(0, 9))
    i = rng.randrange(len(ans))
    return ans[:i] + rng.choice([d for d in "0123456789" if d != ans[i]]) + ans[i + 1:]


def _work(task: dict) -> str:
    fam, args, ans = task["family"], task["args"], task["answer"]
    if fam == "add":
        return f"{args[0]} plus {args[1]} is {ans}."
    if fam == "sort":
        return f"In order they are {ans}."
    if fam == "reverse":
        return f"Backwards, {args[0]} is {ans}."
    return f"The letter {args[0]} is in {args[1]} {ans} times."


def _steps(task: dict) -> List[str]:
    """Three short sentences of work, each naming a number or word of the task (``detailed``
    shows the last two, ``stepwise`` all three)."""
    fam, args, ans = task["family"], task["args"], task["answer"]
    if fam == "add":
        return [f"Start at {args[0]}.", f"Add {args[1]}.", f"That is {ans}."]
    if fam == "sort":
        return [f"Smallest is {min(args)}.", f"Largest is {max(args)}.", f"In order: {ans}."]
    if fam == "reverse":
        return [f"Take {args[0]}.", f"Flip {args[0]}.", f"That gives {ans}."]
    return [f"Take {args[1]}.", f"Find each {args[0]}.", f"That is {ans}."]


def _courteous(rng: random.Random, body: str) -> str:
    """``body`` with an opener and 0 to 2 closers: more words, no more work."""
    return " ".join([rng.choice(OPENERS), body] + rng.sample(CLOSERS, rng.randint(0, 2)))


def make_response(rng: random.Random, task: dict, style: str) -> str:
    ans = task["answer"]
    if style == "clean":
        return f"The answer is {ans}."
    if style == "shown":
        return f"{_work(task)} The answer is {ans}."
    if style in ("wrong", "missing", "extra"):
        return f"The answer is {_edit(rng, task, style)}."
    if style == "filler":
        return f"{rng.choice(FILLERS)} The answer is {ans}."
    if style == "repetition":
        return " ".join([f"The answer is {ans}."] * 3)
    if style == "truncation":
        return "The answer is"
    if style == "off_topic":
        return rng.choice(OFF_TOPIC)
    if style == "bare":
        return f"{ans}."
    if style == "polite_bare":
        return _courteous(rng, f"{ans}.")
    if style == "polite":
        return _courteous(rng, f"The answer is {ans}.")
    if style == "polite_shown":
        return _courteous(rng, f"{_work(task)} The answer is {ans}.")
    if style in ("detailed", "stepwise"):
        steps = _steps(task)[1 if style == "detailed" else 0:]
        return " ".join(steps + [f"The answer is {ans}."])
    raise ValueError(f"unknown response style {style!r}; one of {STYLES + STEERABLE}")


# ------------------------------------------------------------------------------ scorer
def _one_edit(a: str, b: str, family: str) -> bool:
    if family == "count":
        return a.isdigit() and abs(int(a) - int(b)) == 1
    x = a.split(", ") if family == "sort" else list(a)
    y = b.split(", ") if family == "sort" else list(b)
    if len(x) == len(y):
        diff = [i for i in range(len(x)) if x[i] != y[i]]
        return len(diff) == 1 or (len(diff) == 2 and x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]])
    if abs(len(x) - len(y)) != 1:
        return False
    short, long_ = (x, y) if len(x) < len(y) else (y, x)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _correctness(answer: str, meta: dict) -> int:
    return 4 if answer == meta["answer"] else 1 if _one_edit(answer, meta["answer"], meta["family"]) else 0


def _tokens(text: str) -> set:
    return set(re.findall(r"[0-9A-Za-z]+", text))


def _sentences(text: str) -> List[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def _courteous_sentence(sentence: str) -> bool:
    return bool({t.lower() for t in _tokens(sentence)} & set(COURTEOUS)) and not ANSWER.search(sentence)


def _scores(correctness: int, coherence: int, complexity: int, verbosity: int) -> Dict[str, int]:
    """The attribute dict, helpfulness by the rule in the module docstring."""
    helpfulness = (2 * correctness + coherence + 4 - 2 * max(0, verbosity - 2)) // 4
    return {"helpfulness": max(0, min(4, helpfulness)), "correctness": correctness, "coherence": max(0, coherence),
            "complexity": complexity, "verbosity": verbosity, "exact": correctness == 4}


def score_response(meta: dict, response: str) -> Dict[str, int]:
    """The five HelpSteer2 attributes (0..4) of ``response`` to the task ``meta``
    (``family``, ``answer``, ``args``), by the rules in the module docstring."""
    text = response.strip()
    words = len(text.split())
    verbosity = 1 if words <= 6 else 2 if words <= 12 else 3 if words <= 20 else 4
    sentences = _sentences(text)
    bare = [m for m in map(BARE.fullmatch, sentences) if m]
    if len(bare) == 1 and len(sentences) - 1 == sum(_courteous_sentence(s) for s in sentences):
        return _scores(_correctness(bare[0].group(1), meta), coherence=4, complexity=0,
                       verbosity=0 if len(sentences) == 1 else verbosity)
    stated = ANSWER.findall(text)
    task_words = {str(a) for a in meta.get("args", [])} | {meta["answer"]}
    on_topic = bool(stated) or "answer" in text.lower() or any(w in text for w in task_words)
    if not on_topic:
        return {"helpfulness": 1, "correctness": 0, "coherence": 0, "complexity": 0, "verbosity": verbosity,
                "exact": False}
    answer = stated[-1].strip() if stated else None
    if answer is None:
        correctness, coherence = 0, 1
    else:
        correctness = _correctness(answer, meta)
        coherence = 4
        if len(sentences) != len(set(sentences)):
            coherence -= 2
        if any(f in text for f in FILLER_WORDS):
            coherence -= 1
    complexity = 1
    if stated:  # 1 + the sentences of work before the last stated answer
        before = text[:list(ANSWER.finditer(text))[-1].start()]
        work = [s for s in _sentences(before) if not ANSWER.search(s) and not any(f in s for f in HESITATIONS)
                and not _courteous_sentence(s)]
        complexity = 1 + min(3, len(work))
    return _scores(correctness, coherence, complexity, verbosity)


from aligner.data.formats import HELPSTEER2_ATTRIBUTES as ATTRS  # noqa: E402  the one attribute list


# ------------------------------------------------------------------------------ writing
def _write(path: Path, rows: List[dict]) -> Path:
    return write_jsonl(path, rows, sort_keys=True, ensure_ascii=False)


def _task_meta(task: dict) -> dict:
    return {"family": task["family"], "answer": task["answer"], "args": task["args"]}


def synthesize(out_dir, seed: int = 0, n_sft: int = 3000, n_sft_val: int = 200, n_regression: int = 1200,
               n_pairs: int = 1500, n_pairs_val: int = 150, n_heldout: int = 200, n_rewardbench: int = 200,
               flawed_share: float = 0.3, vocab_size: int = 512, styles: str = "standard") -> Dict[str, Path]:
    """Write the world into ``out_dir``; returns the paths by name. ``styles``: ``"standard"``
    (the nine styles) or ``"steerable"`` (with the steerable styles, module docstring)."""
    if styles not in STYLE_SETS:
        raise ValueError(f"synthesize: styles={styles!r}, expected one of {sorted(STYLE_SETS)}")
    good_styles, row_styles = STYLE_SETS[styles]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def task():
        return make_task(rng, rng.choice(FAMILIES))

    def sft_rows(n):
        rows = []
        for _ in range(n):
            t = task()
            style = rng.choice(CORRUPTIONS) if rng.random() < flawed_share else rng.choice(good_styles)
            rows.append({"system": SYSTEM, "conversations": [{"from": "User", "value": t["prompt"]},
                                                             {"from": "Assistant", "value": make_response(rng, t, style)}],
                         "style": style, **_task_meta(t)})
        return rows

    def regression_rows(n_prompts):
        rows = []
        for _ in range(n_prompts):
            t = task()
            for style in rng.sample(row_styles, 2):  # rows 2k and 2k+1 share the prompt
                resp = make_response(rng, t, style)
                s = score_response(t, resp)
                rows.append({"system": SYSTEM, "prompt": t["prompt"], "response": resp,
                             **{a: s[a] for a in ATTRS}, "style": style})
        return rows

    def pair_rows(n, split):
        rows = []
        while len(rows) < n:
            t = task()
            s1, s2 = rng.sample(row_styles, 2)
            r1, r2 = make_response(rng, t, s1), make_response(rng, t, s2)
            h1, h2 = score_response(t, r1)["helpfulness"], score_response(t, r2)["helpfulness"]
            rows.append({"split": split, "system": SYSTEM, "prompt": t["prompt"], "response_1": r1, "response_2": r2,
                         "preference_strength": max(-3, min(3, h2 - h1)), "styles": [s1, s2], **_task_meta(t)})
        return rows

    def prompt_rows(n):
        rows = []
        for _ in range(n):
            t = task()
            rows.append({"system": SYSTEM, "prompt": t["prompt"], **_task_meta(t)})
        return rows

    def rewardbench_rows(n):
        rows = []
        for subset, bad in (("world-easy", ("truncation", "off_topic")),
                            ("world-hard", ("filler", "repetition", "wrong", "missing", "extra"))):
            for i in range(n):
                t = task()
                good = rng.choice(("clean", "shown"))
                rows.append({"id": f"{subset}-{i}", "subset": subset, "system": SYSTEM, "prompt": t["prompt"],
                             "chosen": make_response(rng, t, good),
                             "rejected": make_response(rng, t, rng.choice(bad)), **_task_meta(t)})
        return rows

    paths = {
        "sft_train": _write(out / "sft_train.jsonl", sft_rows(n_sft)),
        "sft_val": _write(out / "sft_val.jsonl", sft_rows(n_sft_val)),
        "regression_train": _write(out / "regression_train.jsonl", regression_rows(n_regression)),
        "regression_val": _write(out / "regression_val.jsonl", regression_rows(max(2, n_regression // 10))),
        "pairs_train": _write(out / "pairs_train.jsonl", pair_rows(n_pairs, "train")),
        "pairs_val": _write(out / "pairs_val.jsonl", pair_rows(n_pairs_val, "validation")),
        "prompts_train": _write(out / "prompts_train.jsonl", prompt_rows(n_sft // 2)),
        "prompts_heldout": _write(out / "prompts_heldout.jsonl", prompt_rows(n_heldout)),
        "rewardbench": _write(out / "rewardbench.jsonl", rewardbench_rows(n_rewardbench)),
    }
    texts = []
    for name in ("sft_train", "regression_train", "pairs_train", "prompts_train"):
        for line in paths[name].read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [v for k, v in row.items() if k in ("prompt", "response", "response_1", "response_2")]
            texts += [c["value"] for c in row.get("conversations", [])]
    texts += ["<extra_id_0>System\n" + SYSTEM, "<extra_id_1>User\n", "<extra_id_1>Assistant\n", "\n<extra_id_2>"]
    paths["tokenizer"] = train_sentencepiece(texts, out / "tokenizer.model", vocab_size=vocab_size, seed=seed)
    manifest = {"seed": seed, "flawed_share": flawed_share, "families": FAMILIES, "styles": row_styles,
                "files": {k: p.name for k, p in paths.items()}}
    if styles != "standard":  # absent: standard (the manifest of the standard world stays as it was)
        manifest["style_set"] = styles
    (out / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


def load_prompts(path, tokenizer) -> Sequence[dict]:
    """Held-out prompt rows as generation inputs, with the task meta the scorer needs."""
    return load_dataset(path, kind="prompts", tokenizer=tokenizer, template="extra_id")


def attribute_table(seed: int = 0, per_style: int = 200) -> Dict[str, Dict[str, float]]:
    """Mean scorer attributes per response style (clean, shown work, each corruption, then
    the steerable styles)."""
    rng = random.Random(seed)
    table = {}
    for style in STYLES + STEERABLE:
        sums = dict.fromkeys(ATTRS, 0.0)
        for _ in range(per_style):
            t = make_task(rng, rng.choice(FAMILIES))
            s = score_response(t, make_response(rng, t, style))
            for a in ATTRS:
                sums[a] += s[a]
        table[style] = {a: sums[a] / per_style for a in ATTRS}
    return table
