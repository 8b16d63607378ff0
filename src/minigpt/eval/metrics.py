"""Standard benchmark metrics: COCO captioning, VQAv2 accuracy, multiple choice (incl. MMBench
circular evaluation) and POPE.  Pure functions over strings; no model code.

Every metric follows a named reference implementation, quirks included, so numbers are comparable
with published ones:

* captions: ``pycocoevalcap`` ``COCOEvalCap`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D with idf from the
  references of the evaluated set), PTBTokenizer when ``java`` is on PATH, otherwise
  :func:`simple_tokenize` (and no METEOR);
* VQA: LAVIS ``lavis/common/vqa_tools/vqa_eval.py`` (= the VQA toolkit's ``vqaEval.py`` before its
  2021 revision), or that 2021 revision (:data:`VQA_LOGICS`);
* multiple choice: VLMEvalKit's exact matcher ``can_infer`` (:func:`vlmevalkit_choice`), or
  minigpt's own :func:`extract_choice`;
* POPE: RUCAIBox/POPE ``evaluate.py``, its answer parsing included.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
Options = Sequence[str] | Mapping[str, str]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# --------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------

# pycocoevalcap's PTBTokenizer drops exactly these tokens.  Because it runs PTBTokenizer with
# -lowerCase, brackets come out as "-lrb-" etc. and are *not* dropped; the fallback keeps that.
_PTB_DROP = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
    '"',
}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_NON_BMP = re.compile("[\U00010000-\U0010ffff]")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off by _CLITIC
    r"|[^\W\d_]+(?:\.[^\W\d_]+)+\.|(?:mr|mrs|ms|dr|st|jr|sr|vs|etc)\."  # e.g., u.s., mr.
    r"|[@#][^\W\d_]\w*|\d+(?::\d+)+"  # @home, #selfie (but "# 1"), times 10:30
    r"|(?:\d+(?:[.,]\d+)+|\w+)(?:[-/&'.]\w+)*"  # 3.5, 1,000, 3.5-inch, well-known, and/or, o'clock
    r"|[.?!]+|-+|\S"  # punctuation runs, then any other single character
)


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed for PTBTokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's PTBTokenizer + punctuation removal.

    Lowercases, splits clitics as PTB does ("isn't" -> "is n't", "dog's" -> "dog 's"), splits
    punctuation off words (keeping numbers such as "3.5"/"1,000", hyphenated words and "e.g."),
    then drops the same punctuation tokens as the COCO toolkit.  Identical to PTBTokenizer on
    ordinary captions; rare constructs (e.g. "@home", sentence-final abbreviations) may differ.
    """
    text = text.replace("\n", " ").replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = _NON_BMP.sub("", text.replace("\u2014", " -- ").replace("\u2013", " -- "))  # PTB drops emoji
    tokens = _TOKEN.findall(_CLITIC.sub(r" \1", text.lower()))
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in _PTB_DROP)


def tokenize_captions(captions: Mapping[K, Sequence[str]], use_java: bool | None = None) -> dict[K, list[str]]:
    """Tokenize ``{id: [caption, ...]}`` like COCOEvalCap: PTBTokenizer (java) or :func:`simple_tokenize`."""
    if use_java if use_java is not None else java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def caption_metrics(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], meteor: bool | None = None
) -> dict[str, float | None]:
    """COCO caption metrics over the predicted ids (as COCOEvalCap evaluates ``cocoRes`` ids).

    Returns ``Bleu_1..Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` (CIDEr-D, idf from the references
    of the evaluated ids).  ``meteor=None`` computes METEOR only when java is on PATH (else
    ``None`` with a logged note); ``True`` requires it; ``False`` skips it.
    """
    return caption_scores(predictions, references, meteor)[0]


def caption_scores(
    predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], meteor: bool | None = None
) -> tuple[dict[str, float | None], dict[K, dict[str, float | None]]]:
    """:func:`caption_metrics` and the same metrics per image (``{id: {"Bleu_1": ...}}``, the scorers'
    per-image outputs: sentence BLEU, METEOR, ROUGE-L and CIDEr-D of each image).

    Blank reference captions are kept, as COCOEvalCap keeps them (they count in CIDEr's mean over
    references and in BLEU's closest reference length).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("no predictions")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise KeyError(f"no references for ids {missing[:5]}")
    java = java_available()
    if meteor and not java:
        raise RuntimeError("METEOR requested but java is not on PATH")
    gts = tokenize_captions({k: list(references[k]) for k in predictions}, use_java=java)
    res = tokenize_captions({k: [v] for k, v in predictions.items()}, use_java=java)
    ids = list(gts)  # the scorers iterate gts.keys(): per-image scores come in this order
    per: dict[str, list[float | None]] = {}

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, float | None] = {}
    for n in range(4):
        out[f"Bleu_{n + 1}"], per[f"Bleu_{n + 1}"] = float(bleu[n]), list(bleu_each[n])
    out["METEOR"], per["METEOR"] = None, [None] * len(ids)
    if meteor is None and not java:
        logger.info("java not on PATH: METEOR skipped, captions tokenized with simple_tokenize")
    elif meteor is not False:
        out["METEOR"], per["METEOR"] = _meteor(gts, res)
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        total, each = scorer.compute_score(gts, res)
        out[name], per[name] = float(total), [float(x) for x in each]
    each_image = {
        k: {m: None if per[m][i] is None else float(per[m][i]) for m in CAPTION_METRICS} for i, k in enumerate(ids)
    }
    return out, each_image


def _meteor(gts: Mapping[K, list[str]], res: Mapping[K, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        total, each = scorer.compute_score(gts, res)
    finally:
        if scorer.lock.locked():  # left held when compute_score raised; __del__ would block on it
            scorer.lock.release()
        del scorer  # its __del__ stops the java process
    return float(total), [float(x) for x in each]


# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, so only "period before digit" survives
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
#: The reference calls ``periodStrip.sub("", outText, re.UNICODE)``: ``re.UNICODE`` (32) lands on ``count``.
_PERIOD_COUNT = int(re.UNICODE)

#: VQA accuracy logics: name -> the reference implementation it reproduces, question by question.
VQA_LOGICS = {
    "lavis": "LAVIS lavis/common/vqa_tools/vqa_eval.py (= GT-Vision-Lab/VQA vqaEval.py before its 2021 revision)",
    "vqaeval2021": "GT-Vision-Lab/VQA vqaEval.py, 2021 revision",
    "lavis+evalai": "LLaVA's answer processing for VQAv2 submissions (llava/eval/m4c_evaluator.py "
    "EvalAIAnswerProcessor, as scripts/convert_vqav2_for_submission.py applies it), then the lavis logic",
    "vqaeval2021+evalai": "LLaVA's EvalAIAnswerProcessor, then GT-Vision-Lab/VQA vqaEval.py, 2021 revision",
}
#: The suffix of a :data:`VQA_LOGICS` name that passes predictions through :func:`evalai_answer` first.
EVALAI = "+evalai"


def vqa_process_punctuation(text: str) -> str:
    """``processPunctuation`` of vqa_eval.py / vqaEval.py.

    Each mark in the list is deleted when it touches a space or when the text contains a
    digit-comma-digit ("1,000" -> "1000"), otherwise replaced by a space ("red,blue" -> "red blue").
    Periods are deleted unless followed by a digit ("3.5" stays, "dog." -> "dog"), at most 32 of
    them, as in the reference.
    """
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """``processDigitArticle`` of vqaEval.py: lowercase, number words -> digits, drop a/an/the, contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Full VQAv2 normalisation applied to a prediction ("Two" -> "2", "the dog." -> "dog")."""
    return vqa_process_digit_article(vqa_process_punctuation(_clean(text)))


def evalai_answer(text: str) -> str:
    """LLaVA's ``EvalAIAnswerProcessor`` (llava/eval/m4c_evaluator.py, from MMF): lowercase, commas and question
    marks deleted ("red,white" -> "redwhite"), "'s" split off, then the VQA punctuation, number, article and
    contraction processing. LLaVA passes its VQAv2 answers through it before they reach the official scorer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_process_digit_article(vqa_process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], logic: str = "lavis") -> float:
    """VQAv2 accuracy of one prediction against the annotators' answers, as the reference computes it.

    Mean over the leave-one-out subsets of ``min(#matches / 3, 1)``: with 10 answers, 1 match -> 0.3,
    2 -> 0.6, 3 -> 0.9, 4+ -> 1.0.  ``logic`` (:data:`VQA_LOGICS`):

    * ``lavis``: the prediction is fully normalised; the answers (normalised already in the VQAv2
      annotation files) get punctuation processing only, and only when they disagree;
    * ``vqaeval2021``: prediction and answers are stripped; when the answers disagree both are fully
      normalised, otherwise they are compared as they are;
    * either with ``+evalai``: the prediction is first passed through :func:`evalai_answer`, as LLaVA's
      published VQAv2 numbers were.
    """
    if not answers:
        raise ValueError("no ground-truth answers")
    if logic in VQA_LOGICS and logic.endswith(EVALAI):
        prediction, logic = evalai_answer(prediction), logic.removesuffix(EVALAI)
    if logic == "lavis":
        pred = normalize_vqa_answer(prediction)
        gts = [vqa_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    elif logic == "vqaeval2021":
        pred, gts = _clean(prediction), [_clean(a) for a in answers]
        if len(set(gts)) > 1:
            pred = vqa_process_digit_article(vqa_process_punctuation(pred))
            gts = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in gts]
    else:
        raise ValueError(f"unknown VQA logic {logic!r}; choose from {', '.join(VQA_LOGICS)}")
    matches = sum(g == pred for g in gts)
    # leaving out a matching answer leaves matches-1 matches, leaving out any other leaves matches
    total = sum(min(1.0, (matches - (g == pred)) / 3) for g in gts)
    return total / len(gts)


# --------------------------------------------------------------------------------------------
# Multiple choice (MMBench, SEED, ScienceQA, ...)
# --------------------------------------------------------------------------------------------


def _as_dict(options: Options) -> dict[str, str]:
    if isinstance(options, Mapping):
        return {k.strip().upper(): str(v) for k, v in options.items()}
    return dict(zip(LETTERS, map(str, options), strict=False))


_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*[(\[]?([A-Za-z])(?![\w'])[)\]]?(?P<after>\s*\S?)", re.I
)
_STANDALONE = re.compile(r"(?<![\w'])[(\[]?([A-Z])(?![\w'])")


def extract_choice(text: str, options: Options) -> str | None:
    """Letter of the option a free-text answer picks, or ``None`` when absent or ambiguous.

    Tried in order: the whole answer is a letter ("b", "(B)", "B."); an explicit "answer/option is
    X" / "Answer: b"; a single standalone capital option letter (the article "A"/pronoun "I" before a
    lowercase word is ignored); the text of exactly one option (longest match wins over options it
    contains).  Several different letters at the same step ("A or B") -> ``None``.
    """
    opts = _as_dict(options)
    stripped = text.strip()
    if not stripped:
        return None
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:,)]?", stripped)
    if m:
        return m.group(1).upper() if m.group(1).upper() in opts else None

    found = set()
    for m in _EXPLICIT.finditer(stripped):
        letter, after = m.group(1), m.group("after")
        # a lowercase letter followed by a word is an article ("the answer is a dog")
        if letter.islower() and after.strip() and after.strip()[0].isalnum():
            continue
        if letter.upper() in opts:
            found.add(letter.upper())
    if found:
        return found.pop() if len(found) == 1 else None

    for m in _STANDALONE.finditer(stripped):
        letter = m.group(1)
        nxt = re.match(r"\s+(\w+)", stripped[m.end() :])
        if letter in "AI" and nxt and nxt.group(1)[0].islower() and nxt.group(1) not in ("or", "and"):
            continue  # "A dog ...", "I think ..."
        if letter in opts:
            found.add(letter)
    if found:
        return found.pop() if len(found) == 1 else None

    low = " ".join(stripped.lower().split())
    hits = {}
    for k, v in opts.items():
        v = " ".join(v.lower().strip().rstrip(".").split())
        if v and re.search(rf"(?<!\w){re.escape(v)}(?!\w)", low):
            hits[k] = v
    hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


_VLMEVAL_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VLMEVAL_STRIP = ".()[],:;!*#{}"


_VLMEVAL_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def vlmevalkit_option(answer: str, options: Options, rules: str = "2024") -> str | None:
    """VLMEvalKit's ``can_infer_option`` (vlmeval/utils/matching_util.py, VERBOSE unset), by ``rules``
    (:data:`VLMEVALKIT_RULES`).

    A refusal phrase -> ``"Z"``; else ``.()[],:;!*#{}`` become spaces, the answer is split into
    words, and when exactly one option letter is a word, that letter (a leading article "A" counts:
    "A dog." -> "A"); when none is and "Z" is a word -> ``"Z"``; otherwise ``None``. From ``2025`` on the one
    letter must be among the last 4 words; from ``2026`` on "(correct) answer is **X**" (any case, X in A-D)
    picks X when the words did not.
    """
    letters = list(_as_dict(options))
    if "Failed to obtain answer via API" in answer:
        return None
    if any(err in answer for err in _VLMEVAL_REFUSALS):
        return "Z"
    mod = answer
    for c in _VLMEVAL_STRIP:
        mod = mod.replace(c, " ")
    words = mod.split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        if rules == "2024" or words.index(found[0]) > len(words) - 5:
            return found[0]
    elif not found and "Z" in words:
        return "Z"
    if rules == "2026" and (m := _VLMEVAL_VERBOSE.search(answer)) and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


def vlmevalkit_text(answer: str, options: Options, rules: str = "2024") -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose lower-cased text is a substring of the
    lower-cased answer, else ``None``; from ``2025`` on, ``None`` when the answer is longer than twice the
    options' texts together."""
    low = answer.lower()
    opts = _as_dict(options)
    if rules != "2024" and len(low) > 2 * sum(len(v) for v in opts.values()):
        return None
    found = [k for k, v in opts.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


#: Versions of VLMEvalKit's matcher: rules name -> the commits whose vlmeval/utils/matching_util.py it equals.
VLMEVALKIT_RULES = {
    "2024": "c6bdffd3 (2024-03-19) up to c3371551 (2025-08-04)",
    "2025": "c3371551 (2025-08-04) up to a67ace50 (2026-06-17)",
    "2026": "a67ace50 (2026-06-17) to e8e78f05 (2026-08-18, HEAD when checked)",
}


def vlmevalkit_choice(answer: str, options: Options, rules: str = "2024") -> str | None:
    """VLMEvalKit's exact matcher ``can_infer``: :func:`vlmevalkit_option`, then :func:`vlmevalkit_text`, by
    ``rules`` (:data:`VLMEVALKIT_RULES`). ``"Z"`` (a refusal) never equals an answer letter, so it scores as a
    miss, as there."""
    return vlmevalkit_option(str(answer), options, rules) or vlmevalkit_text(str(answer), options, rules)


def _vlmevalkit(rules: str) -> Callable[[str, Options], str | None]:
    return lambda answer, options: vlmevalkit_choice(answer, options, rules)


_MATCHER = "VLMEvalKit exact matching (vlmeval/utils/matching_util.py can_infer) as in commits"

#: Answer extractions for multiple choice: name -> (function, what it reproduces).
CHOICE_EXTRACTORS = {
    "vlmevalkit": (vlmevalkit_choice, f"{_MATCHER} {VLMEVALKIT_RULES['2024']}"),
    "vlmevalkit2025": (
        _vlmevalkit("2025"),
        f"{_MATCHER} {VLMEVALKIT_RULES['2025']}: an option letter must be among the last 4 words; "
        "an answer over twice the options' length is not matched to option text",
    ),
    "vlmevalkit2026": (
        _vlmevalkit("2026"),
        f"{_MATCHER} {VLMEVALKIT_RULES['2026']}: the 2025 rules, and '(correct) answer is **X**'",
    ),
    "minigpt": (extract_choice, "minigpt's own answer extraction (extract_choice; not a published protocol)"),
}


def circular_options(options: Options) -> list[list[str]]:
    """MMBench CircularEval orders: rotation ``i`` is ``options[i:] + options[:i]`` (N orders for N options)."""
    texts = list(_as_dict(options).values())
    return [texts[i:] + texts[:i] for i in range(len(texts))]


def circular_answer(answer: str, n_options: int, rotation: int) -> str:
    """Letter of the correct option in rotation ``rotation`` of :func:`circular_options`."""
    return LETTERS[(LETTERS.index(answer.strip().upper()) - rotation) % n_options]


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """POPE answer parsing: in the first sentence (text before the first '.', commas removed,
    split on spaces) any word "No"/"no"/"not" -> "no", otherwise "yes"."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if "No" in words or "no" in words or "not" in words else "yes"


def _label(x: str | bool | int) -> bool:
    if isinstance(x, str):
        x = x.strip().lower()
        if x not in ("yes", "no"):
            raise ValueError(f"POPE label must be yes/no, got {x!r}")
        return x == "yes"
    return bool(x)


def pope_metrics(predictions: Sequence[str], labels: Sequence[str | bool | int]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 (positive class = "yes"), the ratio of "yes" answers, and the counts
    ``tp``, ``fp``, ``tn``, ``fn`` (as LLaVA's ``eval_pope.py`` prints them)."""
    if len(predictions) != len(labels) or not predictions:
        raise ValueError("need equally many (>0) predictions and labels")
    pred = [parse_yes_no(p) == "yes" for p in predictions]
    gold = [_label(y) for y in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pred),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def llava_pope_report(category: str, m: Mapping[str, float]) -> str:
    """What LLaVA's ``llava/eval/eval_pope.py`` prints for one category, from :func:`pope_metrics`' output."""
    return "\n".join(
        [
            f"Category: {category}, # samples: {m['tp'] + m['fp'] + m['tn'] + m['fn']}",
            "TP\tFP\tTN\tFN\t",
            f"{m['tp']}\t{m['fp']}\t{m['tn']}\t{m['fn']}",
            f"Accuracy: {m['accuracy']}",
            f"Precision: {m['precision']}",
            f"Recall: {m['recall']}",
            f"F1 score: {m['f1']}",
            f"Yes ratio: {m['yes_ratio']}",
            ", ".join(f"{m[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")),
            "====================================",
        ]
    )
