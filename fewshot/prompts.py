"""The positive prompts besides a dataset's template: a json file of sentences per class, CuPL's class
descriptions, pinned by commit and sha256 in CUPL_PROMPTS (download.cupl_prompts fetches them), or a named
template ensemble (TEMPLATE_SETS: Tip-Adapter's 7 ImageNet templates)."""
import json
import sys
from pathlib import Path

from fewshot.errors import DataError
from fewshot.files import check_regular

CUPL = "cupl"  # --prompts cupl: CuPL's class descriptions instead of a file
# --prompts NAME: every class's sentences are these templates filled with its name (CLIP's prompt ensembling)
TEMPLATE_SETS = {
    # Tip-Adapter's ImageNet templates (datasets/imagenet.py imagenet_templates, github.com/gaopengcuhk/Tip-Adapter at
    # d0e2d6f), which TaskRes uses for ImageNet too: their published ImageNet numbers are of this ensemble
    "imagenet7": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
}
NAMED = (CUPL, *TEMPLATE_SETS)  # the --prompts values that are not a file
# CuPL's GPT-3 class descriptions (Pratt et al., "What does a platypus look like?", ICCV 2023), one json
# {classname: [sentence, ...]} per dataset, as APE (Zhu et al., ICCV 2023) publishes them for CoOp's datasets;
# pinned to a commit and checked by sha256. ImageNet's file (CuPL_prompts_imagenet.json, beside the others) is
# not pinned yet: for ImageNet and its shift sets, download it and pass --prompts FILE.
_APE = "https://raw.githubusercontent.com/yangyangyang127/APE/8cd042c095c4190f7acecb5f59bb2c5d4de24659/gpt3_prompts"
CUPL_PROMPTS = {  # dataset -> (url, sha256)
    "caltech101": (f"{_APE}/CuPL_prompts_caltech101.json",
                   "b5c3f52be95a1e450c4ebbac1fd0d2644a5d2efc2bac15e1a82cad587fdd09f6"),
    "oxford_pets": (f"{_APE}/CuPL_prompts_oxfordpets.json",
                    "f393a01f911ceed70458d1b7fa3b8f2df2148732210b3783488f2efecc672c95"),
    "stanford_cars": (f"{_APE}/CuPL_prompts_stanfordcars.json",
                      "8b84424728b57442cbe190b0d996fda7a16fbb8ac42617911c61fea8f1496a53"),
    "oxford_flowers": (f"{_APE}/CuPL_prompts_flowers102.json",
                       "904c8850eafeaa1cc60a0f55fab7bdc168af4b2d1e5cb5bd06c5d32cbbc9d676"),
    "food101": (f"{_APE}/CuPL_prompts_food101.json",
                "0aed280ca518c37abec6b1c85a6093b8f9993988df1581bda59805b541694735"),
    "fgvc_aircraft": (f"{_APE}/CuPL_prompts_fgvcaircraft.json",
                      "3d0733867fa1e30a229639df9528d9da3fe11b9cf56c0cd6eda11688d9a31393"),
    "sun397": (f"{_APE}/CuPL_prompts_sun397.json",
               "b6e2c68f1cfaad78a725de1aea337cea8f5481402708225bcecbe8ce8b436967"),
    "dtd": (f"{_APE}/CuPL_prompts_dtd.json",
            "b5d2ae76c1e8e5ded0df87d70aa60ce78730060ae65d7b36c30034457b8cfbe8"),
    "eurosat": (f"{_APE}/CuPL_prompts_eurosat.json",
                "c1831f13dff8f8f2b6e3121b122b4e40582ccc1274537c3f9023641d35d07234"),
    "ucf101": (f"{_APE}/CuPL_prompts_ucf101.json",
               "f685a1d6e8b1316a4f70554d2913c9fb58050af80c96004e6c7b40515488f9e4"),
}


def load_prompts(path, classnames: list[str], template: str) -> list[list[str]]:
    """CuPL-style json {classname: [sentence, ...]} -> the sentences of each class, in label order.

    Class names match after normalising case, underscores and spaces (CuPL files spell them their own way).
    A class the file has no sentences for gets template.format(name) instead, with one warning counting them.
    """
    check_regular(path, "prompts file")
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read prompts file {path}: {e}") from None
    if not isinstance(table, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                              for v in table.values()):
        raise DataError(f"prompts file {path} is not a json object {{classname: [sentence, ...]}}")

    def key(name):
        return " ".join(name.replace("_", " ").lower().split())
    loose = {key(k): v for k, v in table.items()}
    prompts = [table.get(c) or loose.get(key(c)) or [] for c in classnames]
    missing = [c for c, p in zip(classnames, prompts) if not p]
    if len(missing) == len(classnames):
        raise DataError(f"prompts file {path} has sentences for none of the {len(classnames)} classes (e.g. "
                        f"{missing[:3]}); is it another dataset's?")
    if missing:
        print(f"warning: prompts file {path} has no sentences for {len(missing)} of {len(classnames)} classes "
              f"(e.g. {missing[:3]}); they use the template {template!r}", file=sys.stderr)
    return [p or [template.format(c)] for c, p in zip(classnames, prompts)]
