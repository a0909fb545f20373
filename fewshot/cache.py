"""The features file as a cache that grows: what an existing file holds for a run, what the run still needs, and
what differs too much to be added.

A file is one dataset and one model. What it holds is keyed by what determines it: an image's features by the
image (its path, which seeds its augmented crops, and the sha256 of its content), the model's weights (by
content: backbones.weights) and the view recipe; a prompt set's text features by its sentences (the model being
the file's). A file keeps what every run asked of it: the union of their seeds, max-shots and views, and every
prompt set. A run that asks for more encodes only what the file lacks: the images a new seed or a larger
max-shots needs, the views an image lacks, the text of a new prompt set; one that asks for less is served as the
file is (K shots are the first K columns of any larger max-shots, view v of an image does not depend on how many
views there are, and a seed's subsets do not depend on the other seeds). The file written is the one a fresh
extraction with the union of the settings would write.

What changed since a file was made is said and exactly that work is done again: an image whose content changed
under its name (size, times and inode unchanged trust the recorded sha256; any doubt reads the file again), a
folder of the same name elsewhere (its images compared by content), a folder's split, the weights of a checkpoint
or folder replaced at the path the file records (everything is encoded again). What differs by the run's own
request is refused with the difference named: another dataset of the same name, other weights than the file's
(another path with other content), another view recipe (or another precision).
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fewshot import backbones, files
from fewshot.datasets import VAL_SHOTS, Splits, fewshot_rows, is_folder
from fewshot.errors import DataError
from fewshot.features import FORMAT, Settings

# ----------------------------------------------------------------------------- what a run asks for

def plan_encoding(splits: Splits, seeds, max_shots: int, views: int, allow_repeats: bool, flag: str = "--max-shots"):
    """What a file of these settings holds, {split: ((path, label) items, views)}, and the few-shot subsets as rows
    into them: {"fewshot": {seed: [C, max_shots]}, "val_fewshot": {seed: [C, min(max_shots, 4)]}} (those that
    exist). Only the images some seed needs, plus the test split. flag: the flag that set max_shots (in the line
    for a class with fewer images)."""
    jobs, subsets = {"test": (splits.test, 1)}, {}
    labels = lambda items: [y for _, y in items]
    if splits.train:
        rows, subsets["fewshot"] = fewshot_rows(labels(splits.train), splits.classnames, max_shots, list(seeds),
                                                allow_repeats, "training", flag)
        jobs["train"] = ([splits.train[i] for i in rows], views)
    if splits.val:
        rows, subsets["val_fewshot"] = fewshot_rows(labels(splits.val), splits.classnames,
                                                    min(max_shots, VAL_SHOTS), list(seeds), allow_repeats,
                                                    "validation", flag)
        jobs["val"] = ([splits.val[i] for i in rows], 1)
    return jobs, subsets


def union(made: dict, asked: Settings) -> Settings:
    """The settings of a file after a run: the file's seeds, max-shots and views (`made`, as Settings.record() gives
    them) and the run's together."""
    return dataclasses.replace(asked, seeds=tuple(dict.fromkeys([*made["seeds"], *asked.seeds])),
                               max_shots=max(made["max_shots"], asked.max_shots), views=max(made["views"], asked.views),
                               allow_repeats=made["allow_repeats"] or asked.allow_repeats)


def demand(made: dict) -> tuple:
    """What a file's settings hold (seeds, max-shots, views, repeats), to compare before and after a run."""
    return sorted(made["seeds"]), made["max_shots"], made["views"], made["allow_repeats"]


# ----------------------------------------------------------------------------- what is refused

def shown(weights: dict) -> str:
    """Weights in words: their file and sha256, their folder, or their tag."""
    content = weights["content"]
    if "sha256" in content and isinstance(content["sha256"], str):
        return f"{weights['at']} (sha256 {content['sha256'][:12]})"
    if "sha256" in content:
        return f"the folder {weights['at']} ({len(content['sha256'])} files)"
    return content.get("tag") or content.get("hub")


def source_of(settings: Settings, images: Path) -> dict:
    """Where a file's images come from: the benchmark's key or "folder", and the folder its paths are relative to."""
    return {"dataset": "folder" if is_folder(settings.dataset) else settings.dataset, "images": str(images)}


def _named(source: dict) -> str:
    return f"the folder {source['images']}" if source["dataset"] == "folder" else f"the benchmark {source['dataset']}"


def check_made(path: Path, old: dict, absent: Path | None = None):
    """One line unless `old` is a features file this code can check and grow (format v2, with its record). absent:
    the dataset folder, when it is absent (then the file cannot be extracted again)."""
    if not isinstance(old.get("settings"), dict):
        raise DataError(f"{path} exists and is not a features file written by extract_features.py; pass --overwrite "
                        f"to replace it or choose another --features-dir")
    if "pretrained" not in old["settings"]:  # written before the move to open_clip, when no setting named the weights
        why = f"{path} was extracted with OpenAI's clip package, before this project used open_clip"
    elif old.get("format") != FORMAT or not isinstance(old.get("identity"), dict):
        why = (f"{path} was written by an older version of extract_features.py ({old.get('format')}), which did not "
               f"record what its images held, so it can neither be checked nor grown")
    else:
        return
    if absent:
        raise DataError(f"{why}, and the dataset folder {absent} is absent: train on it with --features {path}, or "
                        f"put the dataset under --root and pass --overwrite to extract it again")
    raise DataError(f"{why}: pass --overwrite to extract it again, or choose another --features-dir to keep it")


def check_asked(path: Path, old: dict, settings: Settings, recipe: dict, source: dict | None,
                absent: Path | None = None) -> dict:
    """Refuse, naming the difference, what the run asks for and the file cannot hold: another dataset of the same
    name (source None: not known, the dataset folder `absent` is absent), other weights (another place, other
    content), another view recipe. Returns the weights asked for (backbones.weights), which may be the file's
    replaced."""
    check_made(path, old, absent)
    made = old["identity"]
    if source is not None and made["source"]["dataset"] != source["dataset"]:
        raise DataError(f"{path} holds the features of {_named(made['source'])}, and this run's --dataset is "
                        f"{_named(source)}: two datasets of one name; choose another --features-dir for one of them")
    weights = backbones.weights(settings, made["model"])
    elsewhere = weights["at"] is None or weights["at"] != made["model"]["at"]
    if weights["content"] != made["model"]["content"] and elsewhere:
        raise DataError(f"{path} holds the features of other weights than this run asks for ({shown(made['model'])} in "
                        f"the file, {shown(weights)} asked): pass --overwrite to replace them, or choose another "
                        f"--features-dir")
    had = recorded_recipe(old)
    if had != recipe:
        differ = "; ".join(f"{k}: {had.get(k)!r} in the file, {v!r} asked" for k, v in recipe.items()
                           if had.get(k) != v)
        raise DataError(f"{path} was made with another view recipe ({differ}): pass --overwrite to replace it, or "
                        f"choose another --features-dir")
    return weights


def recorded_recipe(old: dict) -> dict:
    """The view recipe a file records (extraction.image_recipe). A file from before the precision was recorded was
    encoded in float32 (on a CPU; on CUDA the code of that time autocast to float16)."""
    return {"precision": "fp32", **old["identity"]["recipe"]}


def recorded_precision(old: dict | None) -> str | None:
    """The precision a features file's images and text were encoded at; None for no file, or one that does not
    record its recipe (which plan() then refuses or reads as it is)."""
    identity = old.get("identity") if isinstance(old, dict) else None
    if not isinstance(identity, dict) or not isinstance(identity.get("recipe"), dict):
        return None
    return recorded_recipe(old)["precision"]


def replaced(old: dict, weights: dict) -> str | None:
    """The line saying that the file's weights were replaced at their path since it was made, or None."""
    had = old["identity"]["model"]
    if had["content"] == weights["content"]:
        return None
    return (f"the weights at {weights['at']} changed since the features were made ({shown(had)} then, "
            f"{shown(weights)} now): every image and prompt set is encoded again")


def check_absent(path: Path, old: dict, settings: Settings, recipe: dict, folder: Path) -> dict:
    """A file whose dataset folder is absent serves a run only as it is: its weights, seeds, max-shots and views
    must hold what the run asks for (it cannot be extracted again; only a prompt set can be added). Returns the
    weights."""
    weights = check_asked(path, old, settings, recipe, None, folder)
    why = replaced(old, weights)
    made = old["settings"]
    differ = [why.split(":")[0]] if why else []
    if not set(settings.seeds) <= set(made["seeds"]) or settings.max_shots > made["max_shots"]:
        differ.append(f"seeds {made['seeds']} and max-shots {made['max_shots']} in the file, seeds "
                      f"{list(settings.seeds)} and max-shots {settings.max_shots} asked")
    if settings.views > made["views"]:
        differ.append(f"views: {made['views']} in the file, {settings.views} asked")
    if made["allow_repeats"] and not settings.allow_repeats and repeats(old, settings):
        differ.append("the file's subsets repeat images (made with --allow-repeats), and --allow-repeats was not given")
    if differ:
        raise DataError(f"{path} cannot serve this run ({'; '.join(differ)}) and the dataset folder {folder} is "
                        f"absent, so it cannot be extracted again: ask for what the file holds, or put the dataset "
                        f"under --root")
    return weights


def repeats(old: dict, settings: Settings) -> bool:
    """True if a subset the run reads lists an image twice (a class with fewer images than max-shots)."""
    for key, shots in (("fewshot", settings.max_shots), ("val_fewshot", min(settings.max_shots, VAL_SHOTS))):
        for seed in settings.seeds:
            rows = old.get(key, {}).get(seed)
            if rows is not None and any(len(set(r[:shots].tolist())) < len(r[:shots]) for r in rows):
                return True
    return False


# ----------------------------------------------------------------------------- what a run adds

@dataclass
class Work:
    """What a run does with a features file: what the file holds afterwards, and which of it is encoded."""
    settings: Settings   # what the file holds afterwards: the earlier runs' seeds, max-shots and views and the run's
    jobs: dict           # {split: ((path, label) items, views)}, as plan_encoding
    subsets: dict        # {"fewshot": {seed: rows}, "val_fewshot": ...}, as plan_encoding
    kept: dict           # {split: [(old split, old row, views kept) per row]}; views kept 0: encoded whole
    prints: dict         # {absolute image path: (sha256, stat)} of every image the file holds
    texts: dict          # {key: prompt set}; a set whose "text" is None is encoded
    weights: dict        # the model's weights (backbones.weights)
    notes: list          # what changed since the file was made and what the run adds, in words
    write: bool          # the file must be written (else it serves as it is)
    refresh: bool = False  # only the recorded stat of some images changed (their content did not)

    def missing(self, split) -> dict:
        """{first view to encode: [rows]} of a split's rows that lack views."""
        groups = {}
        for row, (_, _, kept) in enumerate(self.kept[split]):
            if kept < self.jobs[split][1]:
                groups.setdefault(kept, []).append(row)
        return groups

    @property
    def images(self) -> int:
        """Images to encode (each counted once, whatever views it lacks)."""
        return sum(len(rows) for split in self.jobs for rows in self.missing(split).values())

    @property
    def views(self) -> int:
        """Views to encode (forward passes)."""
        return sum((self.jobs[split][1] - first) * len(rows) for split in self.jobs
                   for first, rows in self.missing(split).items())

    @property
    def new_texts(self) -> list:
        return [key for key, t in self.texts.items() if t["text"] is None]


def held(old: dict) -> dict:
    """{path: (split, row, views, sha256)} of every image an old file holds."""
    index = {}
    for split in ("train", "val", "test"):
        if split in old:
            views = old[split]["features"].shape[0] if split == "train" else 1
            for row, (p, sha) in enumerate(zip(old["paths"][split], old["content"][split]["sha256"])):
                index[p] = (split, row, views, sha)
    return index


def known_prints(old: dict) -> dict:
    """{absolute path: (sha256, stat)} as an old file recorded them."""
    folder = Path(old["identity"]["source"]["images"])
    return {str(folder / p): (sha, stat) for split, c in old["content"].items()
            for p, sha, stat in zip(old["paths"][split], c["sha256"], c["stat"].tolist())}


def prompt_note(made_with: dict) -> str:
    what = {"templates": "the template"}.get(made_with["prompts"], made_with["prompts"])
    return f"{what} {made_with['template']!r}" if what == "the template" else f"the prompts {what}"


def plan(path: Path, old: dict | None, settings: Settings, splits: Splits, prompt_set: tuple, recipe: dict,
         known: dict | None = None) -> Work:
    """What the run does with the file at `path` (`old`: its dict, None when there is none or with --overwrite):
    what the file holds afterwards, what is kept from it and what is encoded, and why. prompt_set: (key, set) the
    run asks for; known: fingerprints taken earlier in this run (files.fingerprints)."""
    source = source_of(settings, splits.images)
    notes, key = [], prompt_set[0]
    if old is None:
        weights, made, index, texts = backbones.weights(settings), None, {}, {}
        known = dict(known or {})
    else:
        weights = check_asked(path, old, settings, recipe, source)
        made = old["settings"]
        stale = replaced(old, weights)
        notes += [stale] if stale else []
        index = {} if stale else held(old)
        known = {**known_prints(old), **(known or {})}
        if old["identity"]["source"]["images"] != source["images"]:
            notes.append(f"its images were read from {old['identity']['source']['images']}, this run's from "
                         f"{source['images']}: they are compared by content")
        if made.get("split_sha256") != settings.split_sha256 and "split" in old:
            before = {p for part in old["split"].values() for p, _, _ in part}
            now = {p for part in splits.coop_split().values() for p, _, _ in part}
            notes.append(f"the folder's split changed ({len(now - before)} images added, {len(before - now)} removed)")
        texts = dict(old.get("texts", {}))
        if list(old["classnames"]) != splits.classnames:
            notes.append("the class names changed: the file's prompt sets are left out")
            texts = {}
        if stale:
            texts = {k: {**t, "text": None} for k, t in texts.items()}
    goal = union(made, settings) if made else settings
    try:
        jobs, subsets = plan_encoding(splits, goal.seeds, goal.max_shots, goal.views, goal.allow_repeats)
    except DataError:  # the folder lost images since: the file now holds what this run asks for
        notes.append(f"the file's seeds {made['seeds']} and max-shots {made['max_shots']} no longer fit the dataset: "
                     f"it keeps what this run asks for")
        goal = settings
        jobs, subsets = plan_encoding(splits, goal.seeds, goal.max_shots, goal.views, goal.allow_repeats)
    paths = [str(splits.images / p) for items, _ in jobs.values() for p, _ in items]
    prints = files.fingerprints(paths, known)
    kept, changed = {}, []
    for split, (items, views) in jobs.items():
        kept[split] = []
        for p, _ in items:
            had, sha = index.get(p), prints[str(splits.images / p)][0]
            if had is not None and had[3] != sha:
                changed += [p] if sha is not None else []  # None: unreadable, which the extraction says
                had = None
            kept[split].append((had[0], had[1], min(had[2], views)) if had else (None, None, 0))
    if changed:
        notes.append(f"{len(changed)} image{'s' * (len(changed) > 1)} changed content since "
                     f"{'they were' if len(changed) > 1 else 'it was'} encoded ({', '.join(changed[:3])}"
                     f"{', ...' if len(changed) > 3 else ''}): encoded again")
    if key not in texts:
        texts[key] = {**prompt_set[1], "text": None}
        if old is not None:
            notes.append(f"adds the prompt set of {prompt_note(prompt_set[1]['made_with'])}")
    if made and demand(dataclasses.asdict(goal)) != demand(made):
        notes.append(f"grows from seeds {made['seeds']}, max-shots {made['max_shots']}, views {made['views']} to "
                     f"seeds {list(goal.seeds)}, max-shots {goal.max_shots}, views {goal.views}")
    work = Work(goal, jobs, subsets, kept, prints, texts, weights, notes, write=True)
    if old is not None and not work.images and not work.new_texts and not changed and \
            demand(dataclasses.asdict(goal)) == demand(made) and list(old["classnames"]) == splits.classnames and \
            all(old["paths"].get(split) == [p for p, _ in items] for split, (items, _) in jobs.items()):
        recorded = known_prints(old)
        work.write = False
        work.refresh = old["identity"]["source"]["images"] != source["images"] or \
            any(p not in recorded or list(recorded[p][1]) != prints[p][1] for p in paths)
    return work
