"""Pure metric functions that reproduce the official scorers of the benchmarks unillava reports.

Each function names the public scorer it follows, with the repository, file and commit it was
checked against (tests/test_official_scorers.py compares them with transcriptions of that code).
Where that scorer has no rule for a case our procedural data produces (fewer than ten VQA answers, a
missing prediction, no embedding model for GCG phrase similarity), the rule chosen here is stated in
the function's docstring.

Masks are numpy arrays (2-D, any dtype, nonzero = foreground) or COCO RLE dicts
``{"size": [h, w], "counts": str | bytes | list[int]}``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from unillava.data.masks import MaskLike, decode_mask, to_rle

METEOR_NEEDS_JAVA = "METEOR needs Java (apt-get install default-jre-headless)"

# --------------------------------------------------------------------------------------------------
# VQA: GT-Vision-Lab/VQA vqaEval.py (master) and LLaVA's m4c_evaluator.py (EvalAI processing, TextVQA)
# --------------------------------------------------------------------------------------------------

# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# fmt: on
# vqaEval.py is Python 2 code (`print "..."`): its patterns are compiled without re.UNICODE, so there
# `\d` means [0-9] only. The period pattern is transcribed as written: "(?!<=\d)" is a lookahead typo
# for a lookbehind and never fires in front of a period, so the rule is "a period not before a digit".
_VQAEVAL_COMMA = re.compile(r"(\d)(\,)(\d)", re.ASCII)
_VQAEVAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# LLaVA's m4c_evaluator.EvalAIAnswerProcessor runs under Python 3: `\d` is any Unicode digit there.
_EVALAI_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_EVALAI_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# Both official calls pass re.UNICODE (= 32) positionally, i.e. as `count`: at most 32 periods go.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def _punctuation(text: str, comma: re.Pattern[str], period: re.Pattern[str]) -> str:
    """processPunctuation of both official tools: the delete-or-space decision looks at the input text."""
    out = text
    digit_comma = comma.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    """processDigitArticle: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _vqaeval_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """An answer as GT-Vision-Lab/VQA's vqaEval.py normalises it (master, commit a013f00, 2021-03-11).

    Newlines and tabs become spaces and the ends are stripped, then processPunctuation (marks next to
    a space, or anywhere in a text holding an ASCII digit-comma-digit, are deleted; other marks become
    spaces; at most 32 periods not followed by an ASCII digit are deleted), then processDigitArticle
    (lower-case, number words to digits, "none" -> "0", articles dropped, "dont" -> "don't").
    """
    return _digits_articles(_punctuation(_vqaeval_whitespace(answer), _VQAEVAL_COMMA, _VQAEVAL_PERIOD))


def evalai_answer(text: str) -> str:
    """A model answer as LLaVA's EvalAIAnswerProcessor cleans it (haotian-liu/LLaVA llava/eval/m4c_evaluator.py,
    commit ce1aa08), the step LLaVA applies before uploading VQAv2/VizWiz answers and in TextVQA scoring.

    Lower-case; commas and "?" deleted; "'s" becomes " 's"; ends stripped; newlines and tabs to spaces;
    then the VQA punctuation rule (with no comma left, marks are deleted only next to a space; a period
    not before a Unicode digit is deleted, at most 32) and processDigitArticle.
    """
    word = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    word = word.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(word, _EVALAI_COMMA, _EVALAI_PERIOD))


def _leave_one_out(target: str, answers: Sequence[str]) -> float:
    """Mean over the human answers of min(1, #other answers equal to target / 3): one left out at a time."""
    matches = sum(a == target for a in answers)
    return sum(min(1.0, float(matches - int(a == target)) / 3) for a in answers) / len(answers)


def vqaeval_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one submitted answer by the current vqaEval.py (GT-Vision-Lab/VQA master, a013f00).

    Both sides get newlines/tabs -> spaces and stripping. Only when the (so cleaned) human answers are
    not all identical are both normalised with normalize_vqa_answer; when all agree the submitted answer
    must equal them as it stands ("Two" scores 0 against ten "2"). Then the leave-one-out mean of
    min(1, matches / 3). The 2016 version normalised the answer always; this is the 2021 fix.
    """
    if not gt_answers:
        raise ValueError("vqaeval_accuracy needs at least one human answer")
    gts = [_vqaeval_whitespace(a) for a in gt_answers]
    res = _vqaeval_whitespace(answer)
    if len(set(gts)) > 1:
        gts = [normalize_vqa_answer(a) for a in gts]
        res = normalize_vqa_answer(res)
    return _leave_one_out(res, gts)


def llava_vqav2_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 (and VizWiz) accuracy as LLaVA-1.5's numbers were made: the model text goes through
    evalai_answer (scripts/convert_vqav2_for_submission.py), the server scores it with vqaeval_accuracy."""
    return vqaeval_accuracy(evalai_answer(pred), answers)


def textvqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """LLaVA's TextVQA accuracy (m4c_evaluator.TextVQAAccuracyEvaluator, LLaVA commit ce1aa08).

    Prediction and every human answer go through evalai_answer (so "," and "'s" count, unlike VQAv2's
    evaluator), then the leave-one-out mean of min(1, matches / 3). The reference asserts exactly ten
    answers; with another number the same mean is taken over the answers given.
    """
    if not answers:
        raise ValueError("textvqa_accuracy needs at least one human answer")
    return _leave_one_out(evalai_answer(pred), [evalai_answer(a) for a in answers])


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy for the procedural tasks, equal to VQAv2's where the data has ten answers.

    Ten or more human answers: llava_vqav2_accuracy (LLaVA's pipeline on VQAv2). Fewer (our procedural
    data gives one or a few acceptable answers, and the 3-vote rule needs ten voters): a rule of ours,
    1.0 if normalize_vqa_answer(pred) equals normalize_vqa_answer of any answer, else 0.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(answers) >= 10:
        return llava_vqav2_accuracy(pred, answers)
    target = normalize_vqa_answer(pred)
    return 1.0 if any(normalize_vqa_answer(a) == target for a in answers) else 0.0


def answer_in_sentence(sentence: str, answers: Sequence[str]) -> float:
    """1.0 if any VQA-normalised answer occurs in the VQA-normalised sentence as whole words, else 0.0."""
    words = f" {normalize_vqa_answer(sentence)} "
    return float(any(f" {normalize_vqa_answer(a)} " in words for a in answers if normalize_vqa_answer(a)))


def normalize_exact(text: str) -> str:
    """Lower-case, collapse (Unicode) whitespace, strip the ends and any trailing periods."""
    collapsed = " ".join(text.lower().split())
    return collapsed.rstrip(".").rstrip()


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the prediction equals any answer after normalize_exact, else 0.0; a strict companion to VQA accuracy."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    target = normalize_exact(pred)
    return 1.0 if any(normalize_exact(a) == target for a in refs) else 0.0


# --------------------------------------------------------------------------------------------------
# Multiple choice: VLMEvalKit can_infer (open-compass/VLMEvalKit vlmeval/utils/matching_util.py)
# --------------------------------------------------------------------------------------------------

# The version of VLMEvalKit commit c6bdffd3 (2024-03-19); its logic is that of 98e3733 (2024-02-04)
# and stayed unchanged until c3371551 (2025-08-04), so it is the rule ConvLLaVA and OMG-LLaVA were
# scored with. Later versions add a "letter among the last 5 tokens" and a text-length condition.
_MC_SEPARATORS = ".()[],:;!*#{}"
_MC_API_FAILURE = "Failed to obtain answer via API"
_MC_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
NONE_OF_THE_OPTIONS = "Z"


def option_letters(n: int) -> list[str]:
    """Letters for n options (A, B, ...), the labels MMBench prompts use."""
    if not 0 <= n <= 26:
        raise ValueError(f"between 0 and 26 options are supported, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_option: a letter (or "Z") read from the answer's tokens, None for False.

    The API-failure text gives None; a refusal phrase gives "Z" (scored wrong). The marks
    ``.()[],:;!*#{}`` become spaces and the text is split on whitespace; exactly one choice letter among
    the tokens wins (so a leading article "A" counts as a letter); with none, a lone "Z" token gives "Z".
    """
    if _MC_API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _MC_REFUSALS):
        return NONE_OF_THE_OPTIONS
    spaced = answer
    for ch in _MC_SEPARATORS:
        spaced = spaced.replace(ch, " ")
    tokens = [t.strip() for t in spaced.split()]
    found = [letter for letter in choices if letter in tokens]
    if len(found) == 1:
        return found[0]
    if not found and sum(c in tokens for c in ("Z", "")) == 1:
        return NONE_OF_THE_OPTIONS
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_text: the one choice whose lower-cased text is a substring of the lower-cased
    answer (any length of answer; an empty option text is in every answer), else None."""
    lowered = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer (c6bdffd3): can_infer_option, else can_infer_text; None where both fail."""
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_option_letter(text: str, options: Sequence[str]) -> str | None:
    """The letter VLMEvalKit reads from a free-text answer to options A, B, ... (can_infer), or None.

    "Z" means a refusal or "none of the options"; like None it never equals a gold letter. VLMEvalKit
    asks a judge LLM when can_infer fails; under its `exact_matching` policy (no judge, as here) the
    question is wrong.
    """
    return can_infer(text, dict(zip(option_letters(len(options)), options, strict=True)))


# --------------------------------------------------------------------------------------------------
# POPE (RUCAIBox/POPE evaluate.py, LLaVA llava/eval/eval_pope.py)
# --------------------------------------------------------------------------------------------------


def parse_pope_answer(text: str) -> str:
    """Map a free-text answer to "yes"/"no" exactly as the POPE script does.

    Keep the text before the first period, delete commas, split on single spaces; the answer is
    "no" if a token is exactly "No", "no" or "not", otherwise "yes" (so "" and "NO" read as yes,
    as in the official script).
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class, as POPE reports.

    Texts are parsed with parse_pope_answer. A missing prediction (None) is scored as wrong: it takes
    the answer opposite to its label (counts as FN for a "yes" label, FP for a "no" label, and in the
    yes-ratio accordingly). Precision, recall and F1 are 0.0 where their denominator is 0 (the
    official script would divide by zero). Labels must be "yes" or "no".
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        if pred is None:
            answer = "no" if label == "yes" else "yes"
        else:
            answer = parse_pope_answer(pred)
        if answer == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def _inter_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def mask_iou(pred: MaskLike | None, gt: MaskLike) -> float:
    """Intersection over union of two masks; None as prediction is an empty mask.

    Two empty masks give 1.0 (LISA's "no-object target" rule: predicting nothing for nothing is right).
    """
    g = decode_mask(gt)
    p = np.zeros_like(g) if pred is None else decode_mask(pred)
    inter, union = _inter_union(p, g)
    return 1.0 if union == 0 else inter / union


def segmentation_metrics(
    predictions: Sequence[MaskLike | None], ground_truths: Sequence[MaskLike], threshold: float = 0.5
) -> dict[str, float]:
    """cIoU, gIoU and precision@threshold over a split, as LISA / OMG-LLaVA report referring segmentation.

    cIoU = sum of intersections / sum of unions (0.0 if every union is empty); gIoU = mean of the
    per-mask IoU with an empty union counting 1.0; precision@t = fraction of masks with IoU >= t.
    A missing prediction (None) is an empty mask, as for a missing [SEG] token. LISA adds 1e-5 to
    each per-mask union and 1e-10 to the summed union; we divide exactly (a difference below 1e-5).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predicted masks for {len(ground_truths)} ground truths")
    inter_sum = union_sum = 0
    ious: list[float] = []
    for pred, gt in zip(predictions, ground_truths, strict=True):
        g = decode_mask(gt)
        p = np.zeros_like(g) if pred is None else decode_mask(pred)
        inter, union = _inter_union(p, g)
        inter_sum += inter
        union_sum += union
        ious.append(1.0 if union == 0 else inter / union)
    n = len(ious)
    return {
        "ciou": inter_sum / union_sum if union_sum else 0.0,
        "giou": float(np.mean(ious)) if n else 0.0,
        f"precision@{threshold:g}": sum(i >= threshold for i in ious) / n if n else 0.0,
        "n": n,
    }


# --------------------------------------------------------------------------------------------------
# Captions: pycocoevalcap (PTBTokenizer + Cider + Meteor, as COCOEvalCap runs them)
# --------------------------------------------------------------------------------------------------

_SIMPLE_TOKEN = re.compile(r"[^\W_]+")
_METEOR_LOCK = threading.Lock()
_meteor_scorer: Any = None


def java_available() -> bool:
    """Whether a `java` executable is on PATH (the PTB tokenizer and METEOR jars need it)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer, used only when Java is absent.

    Lower-case and keep runs of letters and digits (Unicode-aware), dropping all punctuation and
    underscores. It differs from PTB on contractions ("don't" -> "don t", PTB gives "do n't") and
    brackets (PTB keeps "-lrb-"), so CIDEr computed this way is close to but not the official number.
    """
    return " ".join(_SIMPLE_TOKEN.findall(text.lower()))


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenise like pycocoevalcap's PTBTokenizer.tokenize, in one Java call.

    Same jar, command line (-preserveLines -lowerCase) and punctuation filter as the wrapper, but the
    input file goes to the system temp dir (not into site-packages) and the jar's chatter on stderr
    is captured instead of printed.
    """
    # pycocoevalcap is used on one path only (caption metrics): imported when they are computed.
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = "\n".join(" ".join(t.split("\n")).replace("\r", " ") for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "captions.txt")
        with open(src, "w", encoding="utf-8") as fh:
            fh.write(lines)
        cmd = [
            "java",
            "-cp",
            jar,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            src,
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", errors="replace").strip()[-500:]
        raise subprocess.SubprocessError(
            f"java exited with status {proc.returncode}" + (f": {detail}" if detail else "")
        )
    out = proc.stdout.decode("utf-8", errors="replace").split("\n")
    drop = set(ptb.PUNCTUATIONS)
    return [
        " ".join(w for w in (out[i] if i < len(out) else "").rstrip().split(" ") if w not in drop)
        for i in range(len(texts))
    ]


def _discard_meteor(scorer: Any) -> None:
    """Stop a METEOR process that failed mid-call without deadlocking its __del__.

    pycocoevalcap's Meteor keeps its lock held when compute_score raises, and its __del__ waits for
    that lock, so the process is killed and the lock freed here before the object is dropped.
    """
    with contextlib.suppress(Exception):
        scorer.meteor_p.kill()
        scorer.meteor_p.wait(timeout=10)
    with contextlib.suppress(Exception):
        scorer.meteor_p.stdin.close()
    if scorer.lock.locked():
        scorer.lock.release()


def _close_meteor() -> None:
    global _meteor_scorer
    with _METEOR_LOCK:
        if _meteor_scorer is not None:
            _discard_meteor(_meteor_scorer)
        _meteor_scorer = None


atexit.register(_close_meteor)


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR from one long-lived jar process (starting it costs ~10 s of paraphrase loading)."""
    global _meteor_scorer
    # pycocoevalcap is used on one path only (caption metrics): imported when METEOR is computed.
    from pycocoevalcap.meteor.meteor import Meteor

    with _METEOR_LOCK:
        if _meteor_scorer is None:
            _meteor_scorer = Meteor()
        try:
            score, _ = _meteor_scorer.compute_score(gts, res)
        except Exception:
            _discard_meteor(_meteor_scorer)
            _meteor_scorer = None
            raise
    return float(score)


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    # pycocoevalcap is used on one path only (caption metrics): imported when CIDEr is computed.
    from pycocoevalcap.cider.cider import Cider

    if not any(ref.split() for refs in gts.values() for ref in refs):
        return 0.0
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool = True
) -> dict[str, Any]:
    """CIDEr and METEOR of a split the way COCOEvalCap computes them (what LLaVA/GLaMM report).

    Texts go through the PTB tokenizer, then pycocoevalcap's Cider (idf over this split: a split of
    one sample always scores 0) and Meteor (corpus score of the 1.5 jar). Without Java, METEOR is
    None with a warning saying so, and CIDEr uses simple_tokenize (reported as "tokenizer": "simple").
    Returns {"cider", "meteor", "tokenizer", "warnings"}.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every sample needs at least one reference caption")
    warnings: list[str] = []
    if not predictions:
        return {"cider": None, "meteor": None, "tokenizer": None, "warnings": ["no samples to score"]}
    flat = list(predictions) + [r for refs in references for r in refs]
    have_java = java_available()
    tokens: list[str] | None = None
    tokenizer = "ptb"
    if have_java:
        try:
            tokens = _ptb_tokenize(flat)
        except (OSError, subprocess.SubprocessError) as err:
            warnings.append(f"PTB tokenizer failed ({err}); CIDEr uses the pure-Python tokenisation")
    else:
        warnings.append("Java not found: CIDEr uses a pure-Python tokenisation instead of PTB")
        if meteor:
            warnings.append(METEOR_NEEDS_JAVA)
    if tokens is None:
        tokenizer = "simple"
        tokens = [simple_tokenize(t) for t in flat]
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts: dict[int, list[str]] = {}
    pos = len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[pos : pos + len(refs)]
        pos += len(refs)
    if len(predictions) == 1:
        warnings.append("CIDEr's idf needs several samples: with one sample it is 0")
    result: dict[str, Any] = {"cider": _cider(gts, res), "meteor": None, "tokenizer": tokenizer}
    if meteor and have_java:
        clean = {k: [v[0].replace("|||", " ")] for k, v in res.items()}
        clean_gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
        try:
            result["meteor"] = _meteor(clean_gts, clean)
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            warnings.append(f"METEOR failed, the jar gave no usable answer ({type(err).__name__}: {err})")
    result["warnings"] = warnings
    return result


# --------------------------------------------------------------------------------------------------
# Region captioning attributes
# --------------------------------------------------------------------------------------------------

_ATTR_NUMBERS = {k: v for k, v in _NUMBER_WORDS.items() if k != "none"}


def _attr_words(text: str) -> list[str]:
    return [_ATTR_NUMBERS.get(w, w) for w in _SIMPLE_TOKEN.findall(text.casefold())]


def attribute_in_caption(value: str, caption: str) -> bool:
    """Whether an attribute value appears as whole word(s) in a caption.

    Both are case-folded and split into runs of letters/digits; number words zero..ten become
    digits; a multi-word value must appear as a contiguous run ("light blue"). "red" is not found in
    "reddish", and "grey" does not match "gray".
    """
    want = _attr_words(value)
    have = _attr_words(caption)
    if not want:
        return False
    k = len(want)
    return any(have[i : i + k] == want for i in range(len(have) - k + 1))


def attribute_accuracy(
    captions: Sequence[str | None], attributes: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per-attribute and mean accuracy of region captions that must mention the region's attributes.

    For attribute k a caption is correct if attribute_in_caption(value_k, caption). Each attribute is
    averaged over the samples that have it (None or empty values are skipped); "mean" is the
    unweighted mean over attributes. A missing caption (None) is wrong for every attribute.
    Returns {"per_attribute": {k: acc}, "n": {k: count}, "mean": float | None}.
    """
    if len(captions) != len(attributes):
        raise ValueError(f"{len(captions)} captions for {len(attributes)} attribute sets")
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for caption, attrs in zip(captions, attributes, strict=True):
        for key, value in attrs.items():
            if value is None or not _attr_words(str(value)):
                continue
            total[key] = total.get(key, 0) + 1
            hit = caption is not None and attribute_in_caption(str(value), caption)
            correct[key] = correct.get(key, 0) + int(hit)
    per = {k: correct[k] / total[k] for k in total}
    return {
        "per_attribute": per,
        "n": dict(total),
        "mean": float(np.mean(list(per.values()))) if per else None,
    }


# --------------------------------------------------------------------------------------------------
# Grounded conversation generation (GLaMM eval/gcg/evaluate.py, infer.py)
# --------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<.*?>")
_PHRASE = re.compile(r"<p>(.*?)</p>")


def strip_gcg_markup(text: str) -> str:
    """Plain caption from a grounded answer, as GLaMM's inference script cleans it for caption metrics.

    Newlines become spaces, every <...> tag and every [SEG] token is removed, whitespace is
    collapsed and quotes (') and spaces are stripped from the ends.
    """
    cleaned = _TAG.sub("", text.replace("\n", " ")).replace("[SEG]", "")
    return " ".join(cleaned.split()).strip("'").strip()


def extract_gcg_phrases(text: str) -> list[str]:
    """The grounded phrases of a GCG answer: the stripped contents of each <p>...</p>, in order."""
    return [p.strip() for p in _PHRASE.findall(text.replace("\n", " "))]


def _iou_matrix(rows: Sequence[MaskLike], cols: Sequence[MaskLike]) -> np.ndarray:
    """IoU of every row mask with every column mask; an empty union gives 0 (GLaMM gets NaN, never paired)."""
    a = [decode_mask(m) for m in rows]
    b = [decode_mask(m) for m in cols]
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            inter, union = _inter_union(x, y)
            out[i, j] = inter / union if union else 0.0
    return out


def greedy_iou_pairs(pred_masks: Sequence[MaskLike], gt_masks: Sequence[MaskLike]) -> list[float]:
    """IoUs of GLaMM's one-to-one pairing: repeatedly take the largest remaining IoU (> 0) pair."""
    ious = _iou_matrix(pred_masks, gt_masks)
    paired: list[float] = []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        paired.append(float(ious[i, j]))
        ious = np.delete(np.delete(ious, i, axis=0), j, axis=1)
    return paired


def gcg_miou(
    pred_masks: Sequence[Sequence[MaskLike]], gt_masks: Sequence[Sequence[MaskLike]], *, per_gt: bool = False
) -> float:
    """GCG mask mIoU: the mean over images of the mean IoU of greedy_iou_pairs.

    Official GLaMM rule (per_gt=False): the per-image mean is over the matched pairs only, and an
    image with no pair (no prediction, or nothing overlapping) scores 0.0; unmatched ground-truth
    masks do not lower it. per_gt=True is the stricter variant: the sum of paired IoUs divided by the
    number of ground-truth masks, so each unmatched ground-truth mask counts 0 (an image without
    ground-truth masks scores 1.0 if it also has no predicted mask, else 0.0).
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted images for {len(gt_masks)} ground-truth images")
    scores: list[float] = []
    for preds, gts in zip(pred_masks, gt_masks, strict=True):
        paired = greedy_iou_pairs(preds, gts)
        if per_gt:
            scores.append(sum(paired) / len(gts) if gts else float(not preds))
        else:
            scores.append(float(np.mean(paired)) if paired else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def _phrase_words(text: str) -> list[str]:
    return [w for w in _SIMPLE_TOKEN.findall(text.casefold()) if w not in _ARTICLES]


def phrase_similarity(a: str, b: str) -> float:
    """Token-level F1 of two phrases (case-folded words, articles dropped): our offline stand-in.

    GLaMM compares phrases by cosine similarity of mean-pooled bert-base-uncased embeddings; with no
    embedding model offline we use SQuAD-style token F1 instead (both empty -> 1.0, one empty -> 0.0).
    It is stricter than BERT cosine, which is rarely below 0.5 for any two English phrases.
    """
    x, y = _phrase_words(a), _phrase_words(b)
    if not x or not y:
        return float(not x and not y)
    common = 0
    pool = list(y)
    for w in x:
        if w in pool:
            pool.remove(w)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


def gcg_recall(
    pred_masks: Sequence[Sequence[MaskLike]],
    pred_phrases: Sequence[Sequence[str]],
    gt_masks: Sequence[Sequence[MaskLike]],
    gt_phrases: Sequence[Sequence[str]],
    *,
    iou_threshold: float = 0.5,
    similarity_threshold: float = 0.5,
) -> float:
    """GCG recall: matched ground-truth (phrase, mask) pairs / all ground-truth phrases.

    Per image, as GLaMM's find_best_matches: take the ground-truth/prediction pair with the largest
    remaining mask IoU; if its IoU < iou_threshold or its phrase_similarity < similarity_threshold,
    stop matching in that image (GLaMM breaks rather than trying the next pair); else count it and
    remove its row and column. Phrase i goes with mask i on both sides; a predicted mask without a
    phrase has similarity 0.
    """
    sizes = {len(pred_masks), len(pred_phrases), len(gt_masks), len(gt_phrases)}
    if len(sizes) != 1:
        raise ValueError("gcg_recall needs one entry per image in every argument")
    matched = positives = 0
    for pm, pp, gm, gp in zip(pred_masks, pred_phrases, gt_masks, gt_phrases, strict=True):
        positives += len(gp)
        ious = _iou_matrix(gm, pm)
        sims = np.zeros_like(ious)
        for i in range(min(len(gp), ious.shape[0])):
            for j in range(min(len(pp), ious.shape[1])):
                sims[i, j] = phrase_similarity(gp[i], pp[j])
        while ious.size:
            i, j = np.unravel_index(np.argmax(ious), ious.shape)
            if ious[i, j] < iou_threshold or sims[i, j] < similarity_threshold:
                break
            matched += 1
            ious[i, :] = 0
            ious[:, j] = 0
            sims[i, :] = 0
            sims[:, j] = 0
    return matched / positives if positives else 0.0


def gcg_ap50(
    pred_masks: Sequence[Sequence[MaskLike]], gt_masks: Sequence[Sequence[MaskLike]]
) -> float | None:
    """Mask AP at IoU 0.5 by pycocotools COCOeval ("segm"), one class, every prediction scored 1.0.

    This is GLaMM's AP50 (stats[1] of COCOeval.summarize, maxDets 100). Images are the list indices;
    images without predictions still count their ground truths. None if there is no ground-truth
    mask at all; 0.0 if there are ground truths but no predicted mask.
    """
    # pycocotools.coco imports matplotlib: slow, and only GCG's AP50 needs it.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval  # same: loads pycocotools.coco

    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted images for {len(gt_masks)} ground-truth images")
    images: list[dict[str, Any]] = []
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for image_id, (preds, gts) in enumerate(zip(pred_masks, gt_masks, strict=True), start=1):
        rles = [to_rle(m) for m in gts]
        size = rles[0]["size"] if rles else None
        images.append({"id": image_id, "height": size[0] if size else 0, "width": size[1] if size else 0})
        for rle in rles:
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": list(mask_utils.toBbox(rle)),
                    "iscrowd": 0,
                }
            )
        for m in preds:
            dt_anns.append({"image_id": image_id, "category_id": 1, "segmentation": to_rle(m), "score": 1.0})
    if not gt_anns:
        return None
    if not dt_anns:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": gt_anns,
            "categories": [{"id": 1, "name": "object"}],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_anns)
        evaluator = COCOeval(coco_gt, coco_dt, "segm")
        evaluator.params.catIds = [1]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])
