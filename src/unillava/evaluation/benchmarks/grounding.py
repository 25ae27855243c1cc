"""Grounding benchmarks: RefCOCO/+/g referring segmentation (cIoU, gIoU), referring expression comprehension
(box Acc@0.5), GranDf grounded conversation generation (AP50, mIoU, recall, METEOR, CIDEr) and RefCOCOg
region captions (METEOR, CIDEr).

Masks come only from a segmenting model; a text-only model is still run and scored (its masks are empty, so
mask metrics are 0) and the runner flags the result as "model does not segment".
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.benchmarks.base import (
    Benchmark,
    Column,
    Item,
    LoadResult,
    Prediction,
    Problems,
    first_existing,
    get_id,
    get_str,
    image_dir,
    json_records,
    mean,
    read_json,
    read_jsonl,
    where,
)
from unillava.evaluation.benchmarks.common import dedupe
from unillava.prompts import GCG_PROMPT, REC_PROMPT, REFSEG_PROMPT, REGION_CAPTION_PROMPT

COCO_IMAGE_FOLDERS = (
    "images/mscoco/images/train2014",
    "images/train2014",
    "train2014",
    "coco_2014/train2014",
    "coco/train2014",
    "images",
)


def coco_images(*roots: Path) -> Path:
    """The first COCO image folder found under any of `roots` (LISA's, GLaMM's and plain layouts), else roots[0]."""
    for root in roots:
        for folder in COCO_IMAGE_FOLDERS:
            if (root / folder).is_dir():
                return root / folder
    return roots[0]


class _NoObjects(pickle.Unpickler):
    """Unpickles plain data only: the refs files hold dicts, lists, strings and numbers, nothing else,
    so any class reference is refused (an untrusted pickle cannot run code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a refs file holds plain data only")


def load_refs(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open("rb") as fh:
            refs = _NoObjects(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path}: cannot read the refs pickle ({err})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs")
    return refs


def polygon_or_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A compressed COCO RLE of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return dict(mask_utils.merge(rles))
    if isinstance(segmentation, dict):
        return metrics.to_rle(segmentation)
    raise ValueError("segmentation must be a list of polygons or an RLE dict")


def lisa_gt_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The referring-segmentation ground truth as LISA scores it (dvlab-research/LISA, commit 3cb2d43:
    utils/dataset.py ValDataset + utils/utils.py intersectionAndUnionGPU), as a bool H x W mask.

    LISA decodes each polygon of the object separately (pycocotools frPyObjects + decode), sums them
    and casts to uint8, then computes IoU with two classes: a pixel covered by two or more polygons has
    label 2, which torch.histc leaves out of the class-1 area and which never equals a 0/1 prediction.
    Such pixels therefore count as background. (REFER's refer.py annToMask would merge the polygons
    instead, making them foreground.) The uint8 cast wraps as in LISA; only a pixel under 255 polygons
    (LISA's ignore label, no real object has so many) would be treated differently (background here).
    An empty segmentation is an empty mask. A single RLE dict (our JSONL export; LISA's loader would fail
    on it) is decoded as it is.
    """
    if isinstance(segmentation, dict):
        return metrics.decode_mask(metrics.to_rle(segmentation))
    if not isinstance(segmentation, list):
        raise ValueError("segmentation must be a list of polygons or RLE dicts, or an RLE dict")
    if len(segmentation) == 0:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation[0], list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rles = [metrics.to_rle(r) for r in segmentation]
    with warnings.catch_warnings():
        # pycocotools <= 2.0.10 trips NumPy 2's __array__(copy=...) deprecation; harmless here.
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        stack = mask_utils.decode(rles)
    labels = np.sum(stack, axis=2).astype(np.uint8)
    return labels == 1


_REFER = {
    "refcoco": ("refs(unc).p",),
    "refcoco+": ("refs(unc).p",),
    "refcocog": ("refs(umd).p", "refs(google).p"),
}


class _Refer:
    """Reading RefCOCO-style data: REFER's refs pickle + instances.json, or a simple JSONL export."""

    dataset: str = "refcoco"

    def find(self, root: Path) -> Path | None:
        for folder in (root / self.dataset, root / "refer_seg" / self.dataset, root):
            if first_existing(folder, _REFER[self.dataset]) and (folder / "instances.json").is_file():
                return folder
        return None

    def has_data(self, root: Path) -> bool:
        return self.find(root) is not None or any(root.glob(f"{self.dataset}_*.jsonl"))

    def records(self, root: Path, split: str, problems: Problems) -> tuple[list[dict[str, Any]], Path]:
        """One record per referring expression: {"id", "image", "expression", "segmentation", "bbox", "h", "w", "at"}."""
        jsonl = root / f"{self.dataset}_{split}.jsonl"
        if jsonl.is_file():
            return self._jsonl(jsonl, root, problems), root
        folder = self.find(root)
        if folder is None:
            raise DataError(
                f"{root}: no {self.dataset}/{_REFER[self.dataset][0]} + instances.json (or {jsonl.name})"
            )
        refs_path = first_existing(folder, _REFER[self.dataset])
        assert refs_path is not None
        refs = load_refs(refs_path)
        splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        chosen = [r for r in refs if isinstance(r, dict) and r.get("split") == split]
        if not chosen:
            raise DataError(f"{refs_path}: no refs of split {split!r} (this file has {', '.join(splits)})")
        instances = read_json(folder / "instances.json")
        if not isinstance(instances, dict):
            raise DataError(
                f"{folder / 'instances.json'}: expected a COCO object with 'images' and 'annotations'"
            )
        images = {
            img["id"]: img for img in instances.get("images", []) if isinstance(img, dict) and "id" in img
        }
        anns = {
            ann["id"]: ann
            for ann in instances.get("annotations", [])
            if isinstance(ann, dict) and "id" in ann
        }
        base = coco_images(folder.parent, folder) if folder != root else coco_images(root.parent, root)
        out = []
        for number, ref in enumerate(chosen, start=1):
            at = f"{refs_path} {split} ref {number} (ref_id {ref.get('ref_id')!r})"
            ann, img = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
            if ann is None or img is None:
                problems.add(
                    at,
                    f"ann_id {ref.get('ann_id')!r} or image_id {ref.get('image_id')!r} is not in instances.json",
                )
                continue
            for k, sentence in enumerate(ref.get("sentences") or []):
                text = sentence.get("sent") if isinstance(sentence, dict) else None
                if not isinstance(text, str) or not text.strip():
                    problems.add(f"{at} sentence {k}", "no 'sent' text")
                    continue
                out.append(
                    {
                        "id": f"{ref.get('ref_id')}-{sentence.get('sent_id', k)}",
                        "image": base / img["file_name"],
                        "expression": text.strip(),
                        "segmentation": ann.get("segmentation"),
                        "bbox": ann.get("bbox"),
                        "h": img.get("height"),
                        "w": img.get("width"),
                        "at": at,
                    }
                )
        return out, folder

    def _jsonl(self, path: Path, root: Path, problems: Problems) -> list[dict[str, Any]]:
        images = coco_images(root, root.parent)
        out = []
        for line, obj in read_jsonl(path, problems):
            at = where(path, line)
            rid = get_id(obj, ("id", "question_id"), at, problems)
            image = get_str(obj, "image", at, problems)
            expression = get_str(obj, "expression", at, problems)
            if rid is None or image is None or expression is None:
                continue
            seg = obj.get("mask", obj.get("segmentation"))
            size = seg.get("size") if isinstance(seg, dict) else None
            h, w = (
                size if isinstance(size, list) and len(size) == 2 else (obj.get("height"), obj.get("width"))
            )
            out.append(
                {
                    "id": rid,
                    "image": images / image,
                    "expression": expression.strip(),
                    "segmentation": seg,
                    "bbox": obj.get("bbox"),
                    "h": h,
                    "w": w,
                    "at": at,
                }
            )
        return out


def _size_ok(record: Mapping[str, Any]) -> bool:
    return all(isinstance(record.get(k), int) and record[k] > 0 for k in ("h", "w"))


class RefSeg(_Refer, Benchmark):
    name = "refcoco"
    title = "RefCOCO"
    dataset = "refcoco"
    dirs = ("refer_seg", "refcoco")
    columns = (Column("ciou", "RefCOCO"), Column("giou", "RefCOCO gIoU"))
    default_split = "val"
    segmentation = True
    max_new_tokens = 32
    download = (
        "LISA's `refer_seg/` layout: `refcoco/refs(unc).p` + `refcoco/instances.json` (REFER, github.com/lichengunc/refer) "
        "and COCO train2014 images in `refer_seg/images/mscoco/images/train2014/` (or a JSONL export "
        "`refcoco_<split>.jsonl` with id, image, expression and an RLE `mask`)."
    )
    metric_note = (
        "cIoU = total intersection / total union over the split; gIoU = mean per-expression IoU; ground truth "
        "built as LISA does (polygons summed: pixels under 2+ polygons are background)"
    )

    def recognises(self, root: Path) -> bool:
        return self.has_data(root)

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or self.default_split or "val"
        problems = Problems()
        records, _ = self.records(root, split, problems)
        items = []
        for rec in records:
            if rec["segmentation"] is None or not _size_ok(rec):
                problems.add(rec["at"], "needs a segmentation (or RLE 'mask') and the image height and width")
                continue
            items.append(
                Item(
                    rec["id"],
                    REFSEG_PROMPT.format(expression=rec["expression"]),
                    [rec["image"]],
                    {"segmentation": rec["segmentation"], "h": rec["h"], "w": rec["w"]},
                    {"at": rec["at"]},
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        gts, preds = [], []
        for item in items:
            a = item.answer
            gts.append(metrics.to_rle(lisa_gt_mask(a["segmentation"], a["h"], a["w"])))
            pred = predictions.get(item.id)
            preds.append(pred.masks[0] if pred is not None and pred.masks else None)
        result = metrics.segmentation_metrics(preds, gts)
        return {
            "metrics": {
                "ciou": result["ciou"],
                "giou": result["giou"],
                "precision@0.5": result["precision@0.5"],
            },
            "breakdown": {},
        }


class RefSegPlus(RefSeg):
    name = "refcoco+"
    title = "RefCOCO+"
    dataset = "refcoco+"
    dirs = ("refer_seg", "refcoco+")
    columns = (Column("ciou", "RefCOCO+"), Column("giou", "RefCOCO+ gIoU"))
    download = RefSeg.download.replace(
        "refcoco/refs(unc).p + `refcoco/instances.json", "refcoco+/refs(unc).p + `refcoco+/instances.json"
    )


class RefSegG(RefSeg):
    name = "refcocog"
    title = "RefCOCOg"
    dataset = "refcocog"
    dirs = ("refer_seg", "refcocog")
    columns = (Column("ciou", "RefCOCOg"), Column("giou", "RefCOCOg gIoU"))
    download = RefSeg.download.replace(
        "refcoco/refs(unc).p + `refcoco/instances.json", "refcocog/refs(umd).p + `refcocog/instances.json"
    )


# --------------------------------------------------------------------------------------------------
# Referring expression comprehension (ConvLLaVA's RefCOCO numbers)
# --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box(text: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    """A predicted [x1, y1, x2, y2] in pixels from the first four numbers of the answer.

    Values all <= 1 are LLaVA-1.5's convention: normalised to the image padded to a square (centred),
    so they are mapped back through the padding; larger values are taken as pixels.
    """
    numbers = [float(n) for n in _NUMBER.findall(text)[:4]]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = numbers
    if max(numbers) <= 1.0:
        side = max(width, height)
        dx, dy = (side - width) / 2, (side - height) / 2
        x1, x2 = x1 * side - dx, x2 * side - dx
        y1, y2 = y1 * side - dy, y2 * side - dy
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class RefCOCOREC(_Refer, Benchmark):
    name = "rec-refcoco"
    title = "RefCOCO (REC)"
    dataset = "refcoco"
    dirs = ("refer_seg", "refcoco")
    columns = (Column("accuracy", "RefCOCO REC"),)
    default_split = "val"
    max_new_tokens = 32
    download = RefSeg.download
    metric_note = "Acc@0.5: the predicted box's IoU with the referred object's box is at least 0.5"

    def recognises(self, root: Path) -> bool:
        return self.has_data(root)

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "val"
        problems = Problems()
        records, _ = self.records(root, split, problems)
        items = []
        for rec in records:
            box = rec["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and _size_ok(rec)):
                problems.add(rec["at"], "needs 'bbox' [x, y, w, h] and the image height and width")
                continue
            x, y, w, h = (float(v) for v in box)
            items.append(
                Item(
                    rec["id"],
                    REC_PROMPT.format(expression=rec["expression"]),
                    [rec["image"]],
                    {"box": [x, y, x + w, y + h], "h": rec["h"], "w": rec["w"]},
                    {"at": rec["at"]},
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        hits, unparsed = [], 0
        for item in items:
            pred = predictions.get(item.id)
            box = None if pred is None else parse_box(pred.text, item.answer["w"], item.answer["h"])
            unparsed += box is None
            hits.append(float(box is not None and box_iou(box, item.answer["box"]) >= 0.5))
        return {
            "metrics": {"accuracy": mean(hits), "no_box": unparsed / len(items) if items else 0.0},
            "breakdown": {},
        }


class RefCOCOPlusREC(RefCOCOREC):
    name = "rec-refcoco+"
    title = "RefCOCO+ (REC)"
    dataset = "refcoco+"
    dirs = ("refer_seg", "refcoco+")
    columns = (Column("accuracy", "RefCOCO+ REC"),)
    download = RefSegPlus.download


class RefCOCOgREC(RefCOCOREC):
    name = "rec-refcocog"
    title = "RefCOCOg (REC)"
    dataset = "refcocog"
    dirs = ("refer_seg", "refcocog")
    columns = (Column("accuracy", "RefCOCOg REC"),)
    download = RefSegG.download


# --------------------------------------------------------------------------------------------------
# GranDf grounded conversation generation
# --------------------------------------------------------------------------------------------------


class GCG(Benchmark):
    name = "gcg"
    title = "GranDf GCG"
    dirs = ("GranDf", "grandf", "gcg")
    columns = (
        Column("meteor", "GCG METEOR"),
        Column("cider", "GCG CIDEr"),
        Column("ap50", "GCG AP50"),
        Column("miou", "GCG mIoU"),
        Column("recall", "GCG Recall"),
    )
    default_split = "test"
    segmentation = True
    max_new_tokens = 512
    download = (
        "GLaMM's GranD-f evaluation files `annotations/val_test/{val,test}_gcg_coco_{mask,caption}_gt.json` and "
        "images `GranDf_HA_images/val_test/` (HF MBZUAI/GranD-f)."
    )
    metric_note = (
        "AP50 (COCO segm, one class), mIoU (greedy one-to-one matching), recall (IoU >= 0.5 and phrase "
        "similarity >= 0.5, token F1 instead of BERT cosine), METEOR and CIDEr of the plain caption"
    )

    def _ann_dir(self, root: Path) -> Path | None:
        for folder in (root / "annotations" / "val_test", root / "annotations", root):
            if any(folder.glob("*_gcg_coco_caption_gt.json")):
                return folder
        return None

    def recognises(self, root: Path) -> bool:
        return self._ann_dir(root) is not None

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "test"
        problems = Problems()
        folder = self._ann_dir(root)
        if folder is None:
            raise DataError(f"{root}: no annotations/val_test/{split}_gcg_coco_caption_gt.json")
        cap_path, mask_path = (
            folder / f"{split}_gcg_coco_caption_gt.json",
            folder / f"{split}_gcg_coco_mask_gt.json",
        )
        if not cap_path.is_file() or not mask_path.is_file():
            raise DataError(f"{folder}: needs {cap_path.name} and {mask_path.name} for split {split!r}")
        captions, masks = read_json(cap_path), read_json(mask_path)
        images = image_dir(root, ("GranDf_HA_images/val_test", "images/val_test", "images"))
        sizes = {
            img["id"]: (img.get("height"), img.get("width"))
            for img in masks.get("images", [])
            if isinstance(img, dict)
        }
        gt_masks: dict[Any, list[Any]] = {}
        for number, ann in json_records(mask_path, masks, problems, "annotations"):
            if "segmentation" not in ann or "image_id" not in ann:
                problems.add(where(mask_path, number, "annotation"), "needs 'image_id' and 'segmentation'")
                continue
            gt_masks.setdefault(ann["image_id"], []).append(ann["segmentation"])
        cap_by_image: dict[Any, dict[str, Any]] = {}
        for number, ann in json_records(cap_path, captions, problems, "annotations"):
            if "image_id" in ann:
                cap_by_image.setdefault(
                    ann["image_id"], {**ann, "_at": where(cap_path, number, "annotation")}
                )
        cap_images = [img for _, img in json_records(cap_path, captions, problems, "images")]
        if cap_images and not any(img.get("id") in sizes for img in cap_images):
            raise DataError(
                f"{mask_path}: none of the caption file's images appear here (a mask file for another split?)"
            )
        items = []
        for number, img in enumerate(cap_images, start=1):
            at = where(cap_path, number, "image")
            image_id, file_name = img.get("id"), img.get("file_name")
            ann = cap_by_image.get(image_id)
            if (
                image_id is None
                or not isinstance(file_name, str)
                or ann is None
                or not isinstance(ann.get("caption"), str)
            ):
                problems.add(
                    at, "needs 'id', 'file_name' and a caption annotation with 'caption' and 'labels'"
                )
                continue
            h, w = sizes.get(image_id, (img.get("height"), img.get("width")))
            segs = gt_masks.get(image_id, [])
            labels = ann.get("labels") or []
            if len(labels) != len(segs):
                problems.add(
                    ann["_at"],
                    f"{len(labels)} labels but {len(segs)} ground-truth masks for image {image_id!r}",
                )
                continue
            items.append(
                Item(
                    str(image_id),
                    GCG_PROMPT,
                    [images / file_name],
                    {
                        "caption": ann["caption"],
                        "phrases": [str(x) for x in labels],
                        "masks": segs,
                        "h": h,
                        "w": w,
                    },
                    {"at": at},
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        pred_masks, pred_phrases, captions, gt_masks = [], [], [], []
        for item in items:
            a = item.answer
            gt_masks.append([polygon_or_rle(m, a["h"], a["w"]) for m in a["masks"]])
            pred = predictions.get(item.id)
            text = pred.text if pred is not None else ""
            pred_masks.append(list(pred.masks) if pred is not None and pred.masks else [])
            pred_phrases.append(metrics.extract_gcg_phrases(text))
            captions.append(metrics.strip_gcg_markup(text))
        caps = metrics.caption_metrics(captions, [[item.answer["caption"]] for item in items], meteor=meteor)
        return {
            "metrics": {
                "meteor": caps["meteor"],
                "cider": caps["cider"],
                "ap50": metrics.gcg_ap50(pred_masks, gt_masks),
                "miou": metrics.gcg_miou(pred_masks, gt_masks),
                "recall": metrics.gcg_recall(
                    pred_masks, pred_phrases, gt_masks, [item.answer["phrases"] for item in items]
                ),
            },
            "breakdown": {},
            "warnings": caps["warnings"],
        }


# --------------------------------------------------------------------------------------------------
# RefCOCOg region captions
# --------------------------------------------------------------------------------------------------


def region_prompt(region: Mapping[str, Any], image: Mapping[str, Any]) -> dict[str, Any]:
    """The visual prompt that marks a region for a model that takes one (OMG-LLaVA's `<mark>`).

    OMG-LLaVA's own evaluation (omg_llava region-caption inference) marks the region with its mask when
    the annotation has one ('segmentation' and the image size); otherwise the region is its box, which
    GLaMM's region-captioning inference converts from COCO [x, y, w, h] to [x1, y1, x2, y2].
    """
    h, w = image.get("height"), image.get("width")
    segmentation = region.get("segmentation")
    if segmentation and isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        try:
            return {"type": "mask", "mask": metrics.to_rle(polygon_or_rle(segmentation, h, w))}
        except (ValueError, TypeError):
            pass
    x, y, bw, bh = (float(v) for v in region["bbox"])
    return {"type": "box", "box": [x, y, x + bw, y + bh]}


class RegionCaption(Benchmark):
    name = "refcocog-regcap"
    title = "RefCOCOg region captions"
    dirs = ("RefCoco_Reg", "refcocog_regcap", "region_caption")
    columns = (Column("meteor", "RegCap METEOR"), Column("cider", "RegCap CIDEr"))
    default_split = "val"
    visual_prompt = True
    max_new_tokens = 128
    download = (
        "GLaMM's `mdetr_annotations/finetune_refcocog_val_captions.json` (HF MBZUAI/GranD-f, RefCoco_Reg) and COCO "
        "train2014 images (`train2014/`, `images/train2014/` or GLaMM's `../coco_2014/train2014/`)."
    )
    metric_note = "METEOR and CIDEr (COCOEvalCap) of the caption of the marked region"

    NAMES = (
        "mdetr_annotations/finetune_refcocog_{split}_captions.json",
        "finetune_refcocog_{split}_captions.json",
    )

    def recognises(self, root: Path) -> bool:
        return any(first_existing(root, [n.format(split=s) for n in self.NAMES]) for s in ("val", "test"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "val"
        problems = Problems()
        path = first_existing(root, [n.format(split=split) for n in self.NAMES])
        if path is None:
            raise DataError(f"{root}: no {self.NAMES[0].format(split=split)}")
        data = read_json(path)
        images = coco_images(root, root.parent)
        anns: dict[Any, list[dict[str, Any]]] = {}
        for _, ann in json_records(path, data, problems, "annotations"):
            anns.setdefault(ann.get("image_id"), []).append(ann)
        items = []
        for number, img in json_records(path, data, problems, "images"):
            at = where(path, number, "image")
            image_id = get_id(img, ("id",), at, problems)
            file_name = get_str(img, "file_name", at, problems)
            if image_id is None or file_name is None:
                continue
            regions = anns.get(img["id"], [])
            refs = [
                a["caption"] for a in regions if isinstance(a.get("caption"), str) and a["caption"].strip()
            ]
            if isinstance(img.get("caption"), str) and img["caption"].strip():
                refs.append(img["caption"])
            region = next((a for a in regions if isinstance(a.get("bbox"), list)), None)
            box = None if region is None else region["bbox"]
            numeric = (
                box is not None
                and len(box) == 4
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            )
            if not refs or not numeric:
                problems.add(at, "needs a region annotation with 'bbox' [x, y, w, h] and a 'caption'")
                continue
            prompt = region_prompt(region, img)
            items.append(
                Item(
                    image_id,
                    REGION_CAPTION_PROMPT.format(region="region1 <mark>"),
                    [images / file_name],
                    {"captions": refs, "bbox": box},
                    {"at": at, "region_bbox": box},
                    visual_prompts=[prompt],
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        captions = [
            metrics.strip_gcg_markup(p.text) if (p := predictions.get(item.id)) else "" for item in items
        ]
        caps = metrics.caption_metrics(captions, [item.answer["captions"] for item in items], meteor=meteor)
        return {
            "metrics": {"meteor": caps["meteor"], "cider": caps["cider"]},
            "breakdown": {},
            "warnings": caps["warnings"],
        }
