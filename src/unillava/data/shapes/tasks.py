"""Task records (LLaVA conversation format) built from rendered shapes scenes.

Every answer is derived from the scene's ground truth. Referring expressions are structured specs
(``{"type": "attr" | "relation" | "ordinal" | "reason", ...}``) that :func:`resolve_expression`
evaluates against a scene; an expression is only emitted when it resolves to exactly one object,
and position-based ones only when no other object is within a margin of flipping the answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from unillava.data.shapes.scene import COLOR_NAMES, CORNERS, FINE_TEXT_MAX_FONT, SHAPES, TEXT_CHARS
from unillava.errors import DataError
from unillava.prompts import GCG_PROMPT, PROMPT_LETTER, PROMPT_SHORT, REFSEG_PROMPT, REGION_CAPTION_PROMPT

ALL_TASKS: tuple[str, ...] = (
    "caption",
    "detail",
    "vqa",
    "mc",
    "pope",
    "fine_text",
    "fine_count",
    "refseg",
    "reasonseg",
    "region_caption",
    "region_vqa",
    "gcg",
    "instances",
)
# "instances" is the COCO file under annotations/, not a jsonl.
JSONL_TASKS: tuple[str, ...] = ALL_TASKS[:-1]

# LLaVA-1.5's response-format prompts, on their own line after the question (unillava.prompts).
SHORT_SUFFIX = "\n" + PROMPT_SHORT
MC_SUFFIX = "\n" + PROMPT_LETTER
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for the image.",
    "Write a brief caption for this picture.",
    "Summarize the visual content of the image.",
    "Provide a one-sentence description of the image.",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "What do you see in this image? Describe every object.",
)
REGION_CAPTION_PROMPTS = (
    REGION_CAPTION_PROMPT,
    "What is in {region}? Please describe it briefly.",
    "Please describe the object marked by {region} in the image.",
)
LONG_STYLE_PROB = 0.2
MARGIN = 0.04  # fraction of the image side that separates "clearly left" from "about the same"

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth")
OPTION_LETTERS = "ABCD"
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "ellipse": ("oval",),
    "cross": ("plus", "plus sign"),
    "diamond": ("rhombus",),
    "square": (),
}
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("grey",)}
RELATION_WORDS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
REASON_TEXT: dict[str, str] = {
    "most_corners": "the shape with the most corners",
    "largest": "the largest object",
    "smallest": "the smallest object",
    "topmost": "the object closest to the top",
    "bottommost": "the object closest to the bottom",
    "leftmost": "the object closest to the left edge",
    "rightmost": "the object closest to the right edge",
    "first_letter": "the object whose letter comes first in the alphabet",
    "last_letter": "the object whose letter comes last in the alphabet",
    "largest_number": "the object showing the largest number",
    "smallest_number": "the object showing the smallest number",
}
REASON_PROMPTS = (
    REFSEG_PROMPT,
    "Can you segment {expression}? Please output the segmentation mask.",
    "Find {expression} and segment it.",
)
ATTR_COMBOS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("color",),
    ("text",),
    ("size", "color"),
    ("size", "color", "shape"),
    ("shape", "text"),
    ("color", "shape", "text"),
    ("size", "color", "shape", "text"),
)
BACKGROUND_WORDS = {"flat": "plain", "gradient": "gradient", "noise": "textured"}


# ----------------------------------------------------------------------------------------------
# Phrases


def plural(shape: str) -> str:
    """English plural of a shape name (or "objects")."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def article(phrase: str) -> str:
    """ "a" or "an" for the phrase that follows."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def attrs_of(
    obj: Mapping[str, Any], keys: Iterable[str] = ("size", "color", "shape", "text")
) -> dict[str, Any]:
    """The object's attribute spec restricted to keys (text only if it has one)."""
    return {k: obj[k] for k in keys if obj.get(k) is not None}


def attr_phrase(attrs: Mapping[str, Any], det: str = "the") -> str:
    """ "the large red circle with the letter K"; det "a" picks a/an, "" gives no determiner."""
    words = [attrs[k] for k in ("size", "color") if attrs.get(k)]
    words.append(attrs.get("shape") or "object")
    core = " ".join(words)
    text = attrs.get("text")
    if text:
        core += f" with the {'number' if text.isdigit() else 'letter'} {text}"
    if det == "a":
        det = article(core)
    return f"{det} {core}" if det else core


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _position_phrase(scene: Mapping[str, Any], obj: Mapping[str, Any]) -> str:
    col = min(2, int(3 * obj["center"][0] / scene["width"]))
    row = min(2, int(3 * obj["center"][1] / scene["height"]))
    return (
        ("at the top left", "at the top", "at the top right"),
        ("on the left", "in the center", "on the right"),
        ("at the bottom left", "at the bottom", "at the bottom right"),
    )[row][col]


def _reading_order(scene: Mapping[str, Any]) -> list[dict]:
    def key(o: Mapping[str, Any]) -> tuple[int, int]:
        return (min(2, int(3 * o["center"][1] / scene["height"])), o["center"][0])

    return sorted(scene["objects"], key=key)


def _count_answers(n: int) -> list[str]:
    return [str(n), NUMBER_WORDS[n]] + (["none"] if n == 0 else [])


# ----------------------------------------------------------------------------------------------
# Referring expressions


def _matches(obj: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    return all(obj.get(k) == v for k, v in attrs.items())


def _related(obj: Mapping, anchor: Mapping, relation: str, dx: float, dy: float) -> bool:
    (ox, oy), (ax, ay) = obj["center"], anchor["center"]
    if relation == "left_of":
        return ox < ax - dx
    if relation == "right_of":
        return ox > ax + dx
    if relation == "above":
        return oy < ay - dy
    if relation == "below":
        return oy > ay + dy
    raise DataError(f"unknown relation {relation!r}")


_ORDER_AXIS = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}


def _reason_scores(scene: Mapping[str, Any], query: str) -> list[tuple[float, Mapping]]:
    """(score, object) for the objects a reasoning query ranges over; the highest score wins."""
    objs = scene["objects"]
    if query == "most_corners":
        return [(CORNERS[o["shape"]], o) for o in objs]
    if query in ("largest", "smallest"):
        sign = 1 if query == "largest" else -1
        return [(sign * o["full_area"], o) for o in objs]
    if query == "topmost":
        return [(-o["bbox"][1], o) for o in objs]
    if query == "bottommost":
        return [(o["bbox"][1] + o["bbox"][3], o) for o in objs]
    if query == "leftmost":
        return [(-o["bbox"][0], o) for o in objs]
    if query == "rightmost":
        return [(o["bbox"][0] + o["bbox"][2], o) for o in objs]
    if query in ("first_letter", "last_letter"):
        sign = -1 if query == "first_letter" else 1
        return [(sign * ord(o["text"]), o) for o in objs if o["text"] and o["text"].isalpha()]
    if query in ("largest_number", "smallest_number"):
        sign = 1 if query == "largest_number" else -1
        return [(sign * int(o["text"]), o) for o in objs if o["text"] and o["text"].isdigit()]
    raise DataError(f"unknown reasoning query {query!r}")


def resolve_expression(scene: Mapping[str, Any], spec: Mapping[str, Any], margin: float = 0.0) -> list[int]:
    """Ids of the scene's objects that an expression spec refers to (ascending).

    margin (a fraction of the image width/height) tightens relations when positive and loosens them
    when negative; the generator uses both to reject expressions that hinge on a few pixels.
    """
    objs = scene["objects"]
    kind = spec.get("type")
    if kind == "attr":
        return [o["id"] for o in objs if _matches(o, spec["attrs"])]
    if kind == "relation":
        anchors = [o for o in objs if _matches(o, spec["anchor"])]
        if len(anchors) != 1:
            return []
        dx, dy = margin * scene["width"], margin * scene["height"]
        return [
            o["id"]
            for o in objs
            if o is not anchors[0]
            and _matches(o, spec["target"])
            and _related(o, anchors[0], spec["relation"], dx, dy)
        ]
    if kind == "ordinal":
        axis, sign = _ORDER_AXIS[spec["order"]]
        cands = [o for o in objs if _matches(o, spec["target"])]
        k = int(spec["index"])
        if not 1 <= k <= len(cands):
            return []
        values = sorted(sign * o["center"][axis] for o in cands)
        return [o["id"] for o in cands if sign * o["center"][axis] == values[k - 1]]
    if kind == "reason":
        scored = _reason_scores(scene, spec["query"])
        if not scored:
            return []
        best = max(s for s, _ in scored)
        return sorted(o["id"] for s, o in scored if s == best)
    raise DataError(f"unknown expression type {kind!r}")


def expression_text(spec: Mapping[str, Any]) -> str:
    """The English phrase of an expression spec, e.g. "the second circle from the left"."""
    kind = spec.get("type")
    if kind == "attr":
        return attr_phrase(spec["attrs"])
    if kind == "relation":
        return (
            f"{attr_phrase(spec['target'])} {RELATION_WORDS[spec['relation']]} {attr_phrase(spec['anchor'])}"
        )
    if kind == "ordinal":
        return f"the {ORDINAL_WORDS[spec['index'] - 1]} {attr_phrase(spec['target'], '')} from the {spec['order']}"
    if kind == "reason":
        return REASON_TEXT[spec["query"]]
    raise DataError(f"unknown expression type {kind!r}")


def _unique_attr_specs(scene: Mapping, obj: Mapping, exclude: Iterable[str] = ()) -> list[dict]:
    banned = set(exclude)
    specs = []
    for combo in ATTR_COMBOS:
        if banned.intersection(combo) or ("text" in combo and not obj["text"]):
            continue
        spec = {"type": "attr", "attrs": {k: obj[k] for k in combo}}
        if resolve_expression(scene, spec) == [obj["id"]]:
            specs.append(spec)
    return specs


def _near_edge(obj: Mapping, order: str) -> float:
    """Signed coordinate of the bbox edge facing the side an ordinal counts from."""
    x, y, w, h = obj["bbox"]
    return {"left": x, "right": -(x + w), "top": y, "bottom": -(y + h)}[order]


def _ordinal_specs(
    scene: Mapping, obj: Mapping, exclude: Iterable[str], rng: np.random.Generator
) -> list[dict]:
    banned = set(exclude) | {"text"}
    out = []
    for combo in (("shape",), ("color", "shape"), ("color",), ()):
        if banned.intersection(combo):
            continue
        target = {k: obj[k] for k in combo}
        cands = [o for o in scene["objects"] if _matches(o, target)]
        if len(cands) < 2:
            continue
        for order in _shuffled(rng, list(_ORDER_AXIS)):
            axis, sign = _ORDER_AXIS[order]
            gap = MARGIN * (scene["width"] if axis == 0 else scene["height"])
            mine = sign * obj["center"][axis]
            others = [sign * o["center"][axis] for o in cands if o is not obj]
            if any(abs(v - mine) < gap for v in others):
                continue
            index = 1 + sum(v < mine for v in others)
            # People may rank by the near edge rather than the centre: both must agree.
            edge_rank = 1 + sum(_near_edge(o, order) < _near_edge(obj, order) for o in cands if o is not obj)
            if index > len(ORDINAL_WORDS) or edge_rank != index:
                continue
            spec = {"type": "ordinal", "target": target, "order": order, "index": index}
            if resolve_expression(scene, spec) == [obj["id"]]:
                out.append(spec)
    return out


def _relation_specs(
    scene: Mapping, obj: Mapping, exclude: Iterable[str], rng: np.random.Generator
) -> list[dict]:
    banned = set(exclude) | {"text"}
    out = []
    for combo in (("shape",), ("color", "shape"), ("color",), ()):
        if banned.intersection(combo):
            continue
        target = {k: obj[k] for k in combo}
        for anchor in _shuffled(rng, [o for o in scene["objects"] if o is not obj]):
            anchor_specs = _unique_attr_specs(scene, anchor)
            if not anchor_specs:
                continue
            for relation in _shuffled(rng, list(RELATION_WORDS)):
                spec = {
                    "type": "relation",
                    "target": target,
                    "relation": relation,
                    "anchor": anchor_specs[0]["attrs"],
                }
                want = [obj["id"]]
                if (
                    resolve_expression(scene, spec, -MARGIN) == want
                    and resolve_expression(scene, spec, MARGIN) == want
                ):
                    out.append(spec)
            if len(out) >= 3:
                return out
    return out


def describe(
    scene: Mapping[str, Any],
    obj: Mapping[str, Any],
    rng: np.random.Generator,
    exclude: Iterable[str] = (),
    kinds: Sequence[str] = ("attr", "ordinal", "relation"),
) -> dict | None:
    """A spec that picks out exactly this object without naming the excluded attributes.

    Tries the shortest attribute description first, then ordinals, then relations.
    """
    exclude = tuple(exclude)
    for kind in kinds:
        if kind == "attr":
            specs = _unique_attr_specs(scene, obj, exclude)
        elif kind == "ordinal":
            specs = _ordinal_specs(scene, obj, exclude, rng)
        else:
            specs = _relation_specs(scene, obj, exclude, rng)
        if specs:
            return specs[0]
    return None


def _clear_reason_winner(scene: Mapping[str, Any], query: str) -> Mapping | None:
    """The reasoning query's single target when it wins by a visible margin, else None."""
    scored = sorted(_reason_scores(scene, query), key=lambda so: so[0], reverse=True)
    if len(scored) < 2:
        return None
    (best, obj), (second, _) = scored[0], scored[1]
    if query == "most_corners":
        shapes = {o["shape"] for o in scene["objects"]}
        if best < 3 or best == second or {"star", "cross"} <= shapes:
            return None
    elif query in ("largest", "smallest"):
        big, small = (abs(best), abs(second)) if query == "largest" else (abs(second), abs(best))
        if big < 1.5 * small:
            return None
    elif query in ("topmost", "bottommost", "leftmost", "rightmost"):
        dim = scene["height"] if query in ("topmost", "bottommost") else scene["width"]
        if best - second < 1.25 * MARGIN * dim:
            return None
    elif best == second:
        return None
    ids = resolve_expression(scene, {"type": "reason", "query": query})
    return obj if ids == [obj["id"]] else None


# ----------------------------------------------------------------------------------------------
# Records


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _pick(rng: np.random.Generator, items: Sequence) -> Any:
    return items[int(rng.integers(len(items)))]


def _record(
    scene: Mapping, split: str, index: int, task: str, k: int, human: str, gpt: str, **fields: Any
) -> dict:
    return {
        "id": f"{split}_{index:06d}_{task}_{k}",
        "image": scene["file_name"],
        "task": task,
        "conversations": [{"from": "human", "value": "<image>\n" + human}, {"from": "gpt", "value": gpt}],
        **fields,
    }


def _caption_text(scene: Mapping) -> str:
    objs = sorted(scene["objects"], key=lambda o: -o["full_area"])
    bg = BACKGROUND_WORDS[scene["background"]["type"]]
    phrases = [attr_phrase(attrs_of(o, ("size", "color", "shape")), "a") for o in objs]
    if len(objs) <= 3:
        return _cap(f"{_join(phrases)} on a {bg} background.")
    return f"{_cap(NUMBER_WORDS[len(objs)])} shapes on a {bg} background, including {_join(phrases[:3])}."


def _background_phrase(scene: Mapping) -> str:
    bg = scene["background"]
    if bg["type"] == "gradient":
        return f"a {bg['direction']} gradient background"
    if bg["type"] == "noise":
        return "a noisy, textured background"
    return "a plain background"


def _detail_text(scene: Mapping) -> str:
    objs = scene["objects"]
    by_id = {o["id"]: o for o in objs}
    n = len(objs)
    noun = "object" if n == 1 else "objects"
    sentences = [f"The image shows {NUMBER_WORDS[n]} {noun} on {_background_phrase(scene)}."]
    for o in _reading_order(scene):
        sentence = f"{_cap(_position_phrase(scene, o))} there is {attr_phrase(attrs_of(o), 'a')}."
        if o["occluded_by"]:
            covers = [attr_phrase(attrs_of(by_id[i], ("color", "shape")), "a") for i in o["occluded_by"]]
            sentence += f" It is partly hidden behind {_join(covers)}."
        sentences.append(sentence)
    return " ".join(sentences)


def _vqa_question(scene: Mapping, qtype: str, rng: np.random.Generator) -> tuple[str, list[str], str] | None:
    """(question, answers, long-form answer sentence) of one type, or None when not askable."""
    objs = scene["objects"]
    if qtype == "color":
        o = _pick(rng, objs)
        spec = describe(scene, o, rng, exclude=("color",))
        if spec is None:
            return None
        desc = expression_text(spec)
        return (
            f"What color is {desc}?",
            [o["color"], *COLOR_SYNONYMS.get(o["color"], ())],
            f"{_cap(desc)} is {o['color']}.",
        )
    if qtype == "shape":
        o = _pick(rng, objs)
        spec = describe(scene, o, rng, exclude=("shape",))
        if spec is None:
            return None
        desc = expression_text(spec)
        answers = [o["shape"], *SHAPE_SYNONYMS.get(o["shape"], ())]
        return f"What shape is {desc}?", answers, f"{_cap(desc)} is {article(o['shape'])} {o['shape']}."
    if qtype == "count":
        return _count_question(scene, rng, allow_zero=True)
    if qtype == "exists":
        present = {(o["color"], o["shape"]) for o in objs}
        if rng.random() < 0.5:
            color, shape = _pick(rng, sorted(present))
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            color, shape = _pick(rng, absent)
        phrase = f"{article(color)} {color} {shape}"
        if (color, shape) in present:
            return f"Is there {phrase} in the image?", ["yes"], f"Yes, there is {phrase} in the image."
        return f"Is there {phrase} in the image?", ["no"], f"No, there is no {color} {shape} in the image."
    if qtype == "position":
        if len(objs) < 2:
            return None
        a, b = (objs[i] for i in rng.permutation(len(objs))[:2])
        sa, sb = _unique_attr_specs(scene, a), _unique_attr_specs(scene, b)
        if not sa or not sb:
            return None
        da, db = expression_text(sa[0]), expression_text(sb[0])
        dx = a["center"][0] - b["center"][0]
        dy = a["center"][1] - b["center"][1]
        if abs(dx) >= 2 * MARGIN * scene["width"] and (abs(dx) >= abs(dy) or rng.random() < 0.5):
            side = "left" if dx < 0 else "right"
            return f"Is {da} left or right of {db}?", [side], f"{_cap(da)} is to the {side} of {db}."
        if abs(dy) >= 2 * MARGIN * scene["height"]:
            side = "above" if dy < 0 else "below"
            return f"Is {da} above or below {db}?", [side], f"{_cap(da)} is {side} {db}."
        return None
    if qtype == "text":
        with_text = [o for o in objs if o["text"]]
        if not with_text:
            return None
        o = _pick(rng, with_text)
        return _text_question(scene, o, rng)
    raise DataError(f"unknown vqa question type {qtype!r}")


def _text_question(scene: Mapping, o: Mapping, rng: np.random.Generator) -> tuple[str, list[str], str] | None:
    spec = describe(scene, o, rng, exclude=("text",))
    if spec is None:
        return None
    desc = expression_text(spec)
    kind = "number" if o["text"].isdigit() else "letter"
    word = _pick(rng, (kind, "character"))
    answers = [o["text"]] + ([o["text"].lower()] if o["text"].isalpha() else [])
    return f"What {word} is written on {desc}?", answers, f"The {word} written on {desc} is {o['text']}."


def _count_question(
    scene: Mapping, rng: np.random.Generator, allow_zero: bool, small_only: bool = False
) -> tuple[str, list[str], str]:
    objs = scene["objects"]
    pool = [o for o in objs if o["size"] == "small"] if small_only else objs
    kind = _pick(rng, ("all", "shape", "color", "color_shape"))
    if kind != "all" and pool and (not allow_zero or rng.random() < 0.85):
        ref = _pick(rng, pool)
        attrs = {"shape": ref["shape"]} if kind == "shape" else {"color": ref["color"]}
        if kind == "color_shape":
            attrs = {"color": ref["color"], "shape": ref["shape"]}
    elif kind != "all":
        attrs = {"shape": _pick(rng, SHAPES)} if kind != "color" else {"color": _pick(rng, COLOR_NAMES)}
    else:
        attrs = {}
    if small_only:
        attrs = {"size": "small", **attrs}
    n = sum(_matches(o, attrs) for o in objs)
    words = [attrs[k] for k in ("size", "color") if k in attrs]
    noun_pl = plural(attrs["shape"]) if "shape" in attrs else "objects"
    noun_sg = attrs.get("shape", "object")
    noun = " ".join([*words, noun_pl])
    if n == 0:
        sentence = f"There are no {noun} in the image."
    elif n == 1:
        sentence = f"There is one {' '.join([*words, noun_sg])} in the image."
    else:
        sentence = f"There are {NUMBER_WORDS[n]} {noun} in the image."
    return f"How many {noun} are there in the image?", _count_answers(n), sentence


def _vqa_records(
    scene: Mapping, split: str, index: int, rng: np.random.Generator, task: str = "vqa"
) -> list[dict]:
    qtypes = ["color", "shape", "count", "exists", "position"]
    if any(o["text"] for o in scene["objects"]):
        qtypes.append("text")
    out, seen = [], set()
    for _ in range(16):
        if len(out) >= 4:
            break
        qtype = _pick(rng, qtypes)
        made = _vqa_question(scene, qtype, rng)
        if made is None or made[0] in seen:
            continue
        question, answers, sentence = made
        seen.add(question)
        if rng.random() < LONG_STYLE_PROB:
            human, gpt, style = question, sentence, "long"
        else:
            human, gpt, style = question + SHORT_SUFFIX, answers[0], "short"
        out.append(
            _record(
                scene, split, index, task, len(out), human, gpt, qtype=qtype, answers=answers, style=style
            )
        )
    return out


def _mc_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    objs = scene["objects"]
    out, seen = [], set()
    qtypes = ["color", "shape", "count"] + (["text"] if any(o["text"] for o in objs) else [])
    for _ in range(10):
        if len(out) >= 2:
            break
        qtype = _pick(rng, qtypes)
        if qtype == "count":
            question, answers, _ = _count_question(scene, rng, allow_zero=False)
            correct = answers[0]
            n = int(correct)
            pool = [str(v) for v in range(max(0, n - 3), n + 4) if v != n]
        else:
            if qtype == "text":
                o = _pick(rng, [o for o in objs if o["text"]])
                made = _text_question(scene, o, rng)
                if made is None:
                    continue
                question, correct = made[0], o["text"]
                pool = [c for c in TEXT_CHARS if c != correct and c.isdigit() == correct.isdigit()]
            else:
                o = _pick(rng, objs)
                spec = describe(scene, o, rng, exclude=(qtype,))
                if spec is None:
                    continue
                desc = expression_text(spec)
                question = f"What color is {desc}?" if qtype == "color" else f"What shape is {desc}?"
                correct = o[qtype]
                pool = [v for v in (COLOR_NAMES if qtype == "color" else SHAPES) if v != correct]
        if question in seen:
            continue
        seen.add(question)
        options = _shuffled(rng, [correct, *_shuffled(rng, pool)[:3]])
        letter = OPTION_LETTERS[options.index(correct)]
        body = (
            question + "".join(f"\n{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)) + MC_SUFFIX
        )
        out.append(
            _record(
                scene, split, index, "mc", len(out), body, letter, qtype=qtype, options=options, answer=letter
            )
        )
    return out


def popular_pairs(scenes: Iterable[Mapping[str, Any]], top: int = 20) -> list[list[str]]:
    """(colour, shape) pairs ranked by how many scenes of the split contain them (POPE "popular")."""
    counts: Counter[tuple[str, str]] = Counter()
    for scene in scenes:
        counts.update({(o["color"], o["shape"]) for o in scene["objects"]})
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [list(pair) for pair, _ in ranked[:top]]


def _pope_records(
    scene: Mapping, split: str, index: int, rng: np.random.Generator, popular: Sequence
) -> list[dict]:
    objs = scene["objects"]
    present = sorted({(o["color"], o["shape"]) for o in objs})
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in set(present)]
    colors_here, shapes_here = {c for c, _ in present}, {s for _, s in present}
    negatives = {
        "random": absent,
        "popular": [tuple(p) for p in popular if tuple(p) not in set(present)][:3],
        "adversarial": [(c, s) for c, s in absent if c in colors_here or s in shapes_here],
    }
    out = []
    for category in ("random", "popular", "adversarial"):
        if not negatives[category]:
            continue
        pairs = [(_pick(rng, present), "yes"), (_pick(rng, negatives[category]), "no")]
        for (color, shape), answer in _shuffled(rng, pairs):
            question = f"Is there {article(color)} {color} {shape} in the image?" + SHORT_SUFFIX
            out.append(
                _record(
                    scene, split, index, "pope", len(out), question, answer, answer=answer, category=category
                )
            )
    return out


def _fine_text_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    if scene.get("profile") != "fine":
        return []
    tiny = [o for o in scene["objects"] if o["text"] and o["text_size"] <= FINE_TEXT_MAX_FONT]
    out = []
    for o in _shuffled(rng, tiny)[:2]:
        spec = describe(scene, o, rng, exclude=("text",))
        if spec is None:
            continue
        question = f"What character is written on {expression_text(spec)}?" + SHORT_SUFFIX
        answers = [o["text"]] + ([o["text"].lower()] if o["text"].isalpha() else [])
        out.append(_record(scene, split, index, "fine_text", len(out), question, o["text"], answers=answers))
    return out


def _fine_count_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    if scene.get("profile") != "fine":
        return []
    out, seen = [], set()
    for attempt in range(6):
        if len(out) >= 2:
            break
        question, answers, _ = _count_question(scene, rng, allow_zero=False, small_only=attempt % 2 == 0)
        if question in seen:
            continue
        seen.add(question)
        out.append(
            _record(
                scene,
                split,
                index,
                "fine_count",
                len(out),
                question + SHORT_SUFFIX,
                answers[0],
                answers=answers,
            )
        )
    return out


def _refseg_spec(scene: Mapping, obj: Mapping, rng: np.random.Generator) -> dict | None:
    kinds = _shuffled(rng, ["attr", "attr", "relation", "ordinal"])
    for kind in dict.fromkeys(kinds):
        if kind == "attr":
            specs = [s for s in _unique_attr_specs(scene, obj) if len(s["attrs"]) <= 3]
            if specs:
                return _pick(rng, specs)
        elif kind == "ordinal":
            specs = _ordinal_specs(scene, obj, (), rng)
            if specs:
                return _pick(rng, specs)
        else:
            specs = _relation_specs(scene, obj, (), rng)
            if specs:
                return _pick(rng, specs)
    return None


def _refseg_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    out, used = [], set()
    for obj in _shuffled(rng, scene["objects"])[:3]:
        spec = _refseg_spec(scene, obj, rng)
        if spec is None:
            continue
        expr = expression_text(spec)
        if expr in used:
            continue
        used.add(expr)
        out.append(
            _record(
                scene,
                split,
                index,
                "refseg",
                len(out),
                REFSEG_PROMPT.format(expression=expr),
                f"<p> {expr} </p> [SEG].",
                expression=expr,
                masks=[obj["segmentation"]],
                object_ids=[obj["id"]],
                spec=spec,
            )
        )
    return out


def _reasonseg_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    for query in _shuffled(rng, list(REASON_TEXT)):
        obj = _clear_reason_winner(scene, query)
        if obj is None:
            continue
        target = describe(scene, obj, rng)
        if target is None:
            continue
        spec = {"type": "reason", "query": query}
        expr = REASON_TEXT[query]
        desc = expression_text(target)
        record = _record(
            scene,
            split,
            index,
            "reasonseg",
            0,
            _pick(rng, REASON_PROMPTS).format(expression=expr),
            f"<p> {desc} </p> [SEG].",
            expression=expr,
            description=desc,
            masks=[obj["segmentation"]],
            object_ids=[obj["id"]],
            spec=spec,
            target_spec=target,
        )
        return [record]
    return []


def _visual_prompt(obj: Mapping, kind: str) -> dict[str, Any]:
    if kind == "box":
        x, y, w, h = obj["bbox"]
        return {"type": "box", "box": [x, y, x + w, y + h]}
    if kind == "point":
        return {"type": "point", "point": list(obj["center"])}
    return {"type": "mask", "mask": obj["segmentation"]}


def _marker(kind: str, number: int) -> str:
    return f"point{number} <mark>" if kind == "point" else f"region{number} <region>"


def _prompt_kind(rng: np.random.Generator) -> str:
    return ("box", "point", "mask")[int(rng.choice(3, p=(0.4, 0.3, 0.3)))]


def _region_caption_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for obj in _shuffled(rng, scene["objects"])[:2]:
        kind = _prompt_kind(rng)
        human = _pick(rng, REGION_CAPTION_PROMPTS).format(region=_marker(kind, 1))
        caption = attr_phrase(attrs_of(obj), "a")
        attributes = {k: obj[k] for k in ("color", "shape", "size", "text")}
        out.append(
            _record(
                scene,
                split,
                index,
                "region_caption",
                len(out),
                human,
                caption,
                visual_prompts=[_visual_prompt(obj, kind)],
                answers=[caption],
                attributes=attributes,
                object_ids=[obj["id"]],
            )
        )
    return out


def _region_vqa_records(scene: Mapping, split: str, index: int, rng: np.random.Generator) -> list[dict]:
    objs = scene["objects"]
    out, seen = [], set()
    for _ in range(8):
        if len(out) >= 2:
            break
        qtypes = ["color", "shape", "size"] + (["text"] if any(o["text"] for o in objs) else [])
        qtypes += ["same_color", "same_shape"] if len(objs) >= 2 else []
        qtype = _pick(rng, qtypes)
        if qtype.startswith("same_"):
            attr = qtype[5:]
            first = _pick(rng, objs)
            same = [o for o in objs if o is not first and o[attr] == first[attr]]
            others = [o for o in objs if o is not first]
            second = _pick(rng, same) if same and rng.random() < 0.5 else _pick(rng, others)
            targets = [first, second]
            kinds = [_prompt_kind(rng), _prompt_kind(rng)]
            m1, m2 = _marker(kinds[0], 1), _marker(kinds[1], 2)
            question = f"Is the object in {m1} the same {attr} as the object in {m2}?"
            answers = ["yes" if first[attr] == second[attr] else "no"]
        else:
            pool = [o for o in objs if o["text"]] if qtype == "text" else objs
            obj = _pick(rng, pool)
            targets, kinds = [obj], [_prompt_kind(rng)]
            m1 = _marker(kinds[0], 1)
            if qtype == "text":
                question = f"What character is written on the object in {m1}?"
                answers = [obj["text"]] + ([obj["text"].lower()] if obj["text"].isalpha() else [])
            elif qtype == "size":
                question = f"Is the object in {m1} small, medium or large?"
                answers = [obj["size"]]
            else:
                question = f"What {qtype} is the object in {m1}?"
                synonyms = COLOR_SYNONYMS if qtype == "color" else SHAPE_SYNONYMS
                answers = [obj[qtype], *synonyms.get(obj[qtype], ())]
        key = (question, tuple(o["id"] for o in targets))
        if key in seen:
            continue
        seen.add(key)
        out.append(
            _record(
                scene,
                split,
                index,
                "region_vqa",
                len(out),
                question + SHORT_SUFFIX,
                answers[0],
                qtype=qtype,
                visual_prompts=[_visual_prompt(o, k) for o, k in zip(targets, kinds, strict=True)],
                answers=answers,
                object_ids=[o["id"] for o in targets],
            )
        )
    return out


def _gcg_record(scene: Mapping, split: str, index: int) -> dict:
    objs = _reading_order(scene)
    phrases = [attr_phrase(attrs_of(o), "a") for o in objs]
    positions = [_position_phrase(scene, o) for o in objs]
    bg = f" The background is {BACKGROUND_WORDS[scene['background']['type']]}."
    marked = "The image shows " + _join(
        [f"<p> {p} </p> [SEG] {pos}" for p, pos in zip(phrases, positions, strict=True)]
    )
    plain = "The image shows " + _join([f"{p} {pos}" for p, pos in zip(phrases, positions, strict=True)])
    return _record(
        scene,
        split,
        index,
        "gcg",
        0,
        GCG_PROMPT,
        marked + "." + bg,
        phrases=phrases,
        masks=[o["segmentation"] for o in objs],
        object_ids=[o["id"] for o in objs],
        answers=[plain + "." + bg],
    )


def build_scene_tasks(
    scene: Mapping[str, Any],
    split: str,
    index: int,
    tasks: Iterable[str],
    seed: int | Sequence[int],
    popular: Sequence[Sequence[str]] = (),
) -> dict[str, list[dict]]:
    """All task records of one scene, keyed by task name.

    Each task draws from its own generator (seed + task position), so asking for a subset of tasks
    produces the same records for the tasks that remain.
    """
    base = list(seed) if isinstance(seed, Sequence) else [seed]
    out: dict[str, list[dict]] = {}
    if not scene["objects"]:
        return {t: [] for t in tasks if t in JSONL_TASKS}
    for task in tasks:
        if task not in JSONL_TASKS:
            continue
        rng = np.random.default_rng([*base, ALL_TASKS.index(task)])
        if task == "caption":
            text = _caption_text(scene)
            out[task] = [
                _record(scene, split, index, task, 0, _pick(rng, CAPTION_PROMPTS), text, answers=[text])
            ]
        elif task == "detail":
            text = _detail_text(scene)
            out[task] = [
                _record(scene, split, index, task, 0, _pick(rng, DETAIL_PROMPTS), text, answers=[text])
            ]
        elif task == "vqa":
            out[task] = _vqa_records(scene, split, index, rng)
        elif task == "mc":
            out[task] = _mc_records(scene, split, index, rng)
        elif task == "pope":
            out[task] = _pope_records(scene, split, index, rng, popular)
        elif task == "fine_text":
            out[task] = _fine_text_records(scene, split, index, rng)
        elif task == "fine_count":
            out[task] = _fine_count_records(scene, split, index, rng)
        elif task == "refseg":
            out[task] = _refseg_records(scene, split, index, rng)
        elif task == "reasonseg":
            out[task] = _reasonseg_records(scene, split, index, rng)
        elif task == "region_caption":
            out[task] = _region_caption_records(scene, split, index, rng)
        elif task == "region_vqa":
            out[task] = _region_vqa_records(scene, split, index, rng)
        elif task == "gcg":
            out[task] = [_gcg_record(scene, split, index)]
    return out


__all__ = [
    "ALL_TASKS",
    "JSONL_TASKS",
    "attr_phrase",
    "build_scene_tasks",
    "describe",
    "expression_text",
    "popular_pairs",
    "resolve_expression",
]
