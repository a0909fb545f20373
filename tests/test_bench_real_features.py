"""bench/real_features.py (fewshot/realfeatures.py): the per-K, per-seed features files it builds, the dev folds,
the sub-tasks, the tuned block, the graph study, the whole command's outputs, and its skip when the data is absent;
and that no test image of any task is read by a training draw, a dev fold or a search of any task, seed, K or fold
(on a stand-in of the real file's shape, and on the real file when it is there)."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import fewshot.features as ff
import fewshot.realfeatures as real_features
from fewshot import tasks, training


def fake_real(C=6, per_class=7, d=16, counts=None, assigned=True):
    """A stand-in for the real file: same keys, random unit features, 7 images per class (or counts[c]), with
    each seed's assignment of its images (realfeatures.assign) unless not `assigned`."""
    counts = torch.tensor(counts) if counts is not None else torch.full((C,), per_class)
    C = len(counts)
    labels = torch.arange(C).repeat_interleave(counts)
    real = {"image_features": F.normalize(torch.randn(len(labels), d), dim=-1).half(), "labels": labels,
            "text_features": {"a photo of a {}.": F.normalize(torch.randn(C, d), dim=-1).half()},
            "classnames": [f"c{c}" for c in range(C)], "backbone": "ViT-B/32"}
    return real_features.assign(real) if assigned else real


def test_features_file_splits_k_per_class_and_the_same_test_set_for_every_k(tmp_path):
    real = fake_real()
    tests = []
    for shots in (1, 2, 4):
        path = tmp_path / f"{shots}.pt"
        real_features.features_file(real, shots, seed=1, path=path)
        data = ff.load_features(path)
        task = tasks.make_task(data, 1, shots, "cpu", negatives=False)
        assert task.train_views.shape == (1, 6 * shots, 16)
        assert torch.equal(torch.bincount(task.train_labels), torch.full((6,), shots))
        assert task.test[0].shape[0] == 6 * (7 - real_features.POOL)       # the pool never tests, at any K
        tests.append({tuple(r.tolist()) for r in task.test[0].half()})
        rows = {tuple(r.tolist()) for r in torch.cat([task.train_views[0], task.test[0]]).half()}
        assert len(rows) == 6 * shots + 18                                 # train and test are disjoint images
    assert tests[0] == tests[1] == tests[2]
    # nested: the 1-shot image of each class is the first of its 4-shot images, for the same seed
    one, four = (ff.load_features(tmp_path / f"{k}.pt")["train"]["features"][0] for k in (1, 4))
    assert torch.equal(one, four.view(6, 4, 16)[:, 0])


def test_dev_protocol_uses_only_the_4_shot_training_images(tmp_path):
    real = fake_real()
    real_features.features_file(real, 4, seed=2, path=tmp_path / "k4.pt")
    real_features.features_file(real, 1, seed=2, path=tmp_path / "dev.pt", dev=True)
    pool = {tuple(r.tolist()) for r in torch.load(tmp_path / "k4.pt")["train"]["features"][0]}
    dev = torch.load(tmp_path / "dev.pt")
    used = torch.cat([dev["train"]["features"][0], dev["test"]["features"]])
    assert used.shape[0] == 6 * 4 and {tuple(r.tolist()) for r in used} == pool


def test_skips_cleanly_without_the_real_file(tmp_path, capsys):
    real_features.main(["--file", str(tmp_path / "absent.pt")])
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "results").exists()


def test_dev_folds_rotate_the_pool_so_each_image_trains_once_at_one_shot(tmp_path):
    real = fake_real()
    pool = {tuple(r.tolist()) for r in torch.load(_write(real, 4, tmp_path / "k4.pt"))["train"]["features"][0]}
    trained = []
    for fold in range(real_features.DEV_FOLDS):
        dev = torch.load(_write(real, 1, tmp_path / f"f{fold}.pt", dev=True, fold=fold))
        used = torch.cat([dev["train"]["features"][0], dev["test"]["features"]])
        assert {tuple(r.tolist()) for r in used} == pool                  # each fold: the same 4-shot pool
        trained += [tuple(r.tolist()) for r in dev["train"]["features"][0]]
    assert sorted(trained) == sorted(pool)                                # every pool image trains exactly once


def _write(real, shots, path, **kwargs):
    real_features.features_file(real, shots, seed=2, path=path, **kwargs)
    return path


def test_subtasks_pick_their_classes_and_relabel_them(tmp_path):
    real = fake_real(C=12, per_class=5)
    # classes 3..7 share one direction: the densest visual neighbourhood of size 5
    shared = F.normalize(torch.randn(16), dim=0)
    close = torch.isin(real["labels"], torch.arange(3, 8))
    real["image_features"][close] = F.normalize(shared + 0.05 * torch.randn(int(close.sum()), 16), dim=-1).half()
    assert real_features.task_classes(real, "fine-grained-5") == [3, 4, 5, 6, 7]
    picked = real_features.task_classes(real, "random-6")
    assert len(set(picked)) == 6 and picked == real_features.task_classes(real, "random-6")   # fixed draw
    sub = real_features.subtask(real, [2, 9])
    assert sub["classnames"] == ["c2", "c9"] and sorted(set(sub["labels"].tolist())) == [0, 1]
    assert torch.equal(sub["image_features"][sub["labels"] == 1], real["image_features"][real["labels"] == 9])
    assert torch.equal(sub["text_features"]["a photo of a {}."][1], real["text_features"]["a photo of a {}."][9])


def test_tuned_block_scores_every_grid_point_on_dev_folds_only(tmp_path, monkeypatch):
    """The tuned point is the argmax of the dev means, and the test split is scored only at that point."""
    real = fake_real(C=4, per_class=8, d=8)
    seen = []
    original = real_features.test_accuracy
    monkeypatch.setattr(real_features, "test_accuracy",
                        lambda row, data, shots, seed, point, **kw: seen.append(point) or
                        original(row, data, shots, seed, point, **kw))
    cache = real_features.Cache(tmp_path / "c.jsonl")
    out = real_features.block(cache, real, "t", ["tip"], tuned=True)["tip"]
    point, dev = real_features.tune(cache, real, "t", "tip")
    assert out["point"] == point == max(dev, key=lambda d: d[1])[0] and len(dev) == 12
    assert all(p == point for p in seen) and len(seen) == 9               # 3 K x 3 seeds, at the chosen point
    again = real_features.block(real_features.Cache(tmp_path / "c.jsonl"), real, "t", ["tip"], tuned=True)
    assert again["tip"]["acc"] == out["acc"] and len(seen) == 9           # the rerun reads the cache


def test_the_graph_study_tunes_each_design_on_dev_folds_and_pairs_it_with_the_bias_only(tmp_path, monkeypatch,
                                                                                         tripwire):
    real = fake_real(C=4, per_class=8, d=8)
    monkeypatch.setattr(real_features, "STUDY", {"E2 sparse edges": real_features.STUDY["E2 sparse edges"]})
    monkeypatch.setattr(real_features, "SEEDS", (1, 2))
    wire = tripwire(real_features, "test_accuracy", "the study read a test image")
    monkeypatch.setattr(training, "train", lambda model, views, labels, recipe, seed, desc="": {})   # no training: fast
    cache = real_features.Cache(tmp_path / "c.jsonl")
    out = real_features.study(cache, real, "t", ["hegraph-bias", "E2 sparse edges"])
    points, units = real_features.dev_units(cache, real, "t", "E2 sparse edges")
    assert len(points) == 12 and out["E2 sparse edges"]["point"]["neighbours"] in (5, 10, 20)
    i = points.index(out["E2 sparse edges"]["point"])
    seed2 = [v[i] for (k, s, f), v in units.items() if s == 2]
    assert out["E2 sparse edges"]["per_seed"][1] == pytest.approx(sum(seed2) / len(seed2))
    table = real_features.markdown_study(out, "t")
    assert "| `hegraph-bias` |" in table and "| `E2 sparse edges` |" in table
    # live: the blocks that report test accuracy do call it
    wire.proven(lambda: real_features.block(real_features.Cache(tmp_path / "d.jsonl"), real, "t", ["tip"], tuned=False))


def test_main_writes_both_blocks_of_every_task_and_the_figure(tmp_path, monkeypatch):
    """The whole command: two tasks x both blocks -> one markdown, one json and one figure panel per task."""
    path = tmp_path / "real.pt"
    torch.save(fake_real(C=6, per_class=8, d=8, assigned=False), path)
    monkeypatch.setattr(training, "train", lambda model, views, labels, recipe, seed, desc="": {})   # no training: fast
    monkeypatch.setattr(real_features, "SEEDS", (1, 2))
    monkeypatch.setattr(real_features, "DEV_FOLDS", 1)                    # the whole command, not its size
    real_features.main(["--file", str(path), "--tasks", "all", "random-4", "--rows", "zeroshot", "tip", "hegraph",
                        "--cache", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "real_features.md").read_text()
    for title in ("all (6 classes, 48 images, 24 of them the test set), published defaults",
                  "all (6 classes, 48 images, 24 of them the test set), tuned on the dev",
                  "random-4 (4 classes, 32 images, 16 of them the test set), published defaults",
                  "random-4 (4 classes, 32 images, 16 of them the test set), tuned"):
        assert title in text
    results = json.loads((tmp_path / "out" / "real_features.json").read_text())
    assert len(results) == 4 and all(set(r) == {"zeroshot", "tip", "hegraph"} for r in results.values())
    assert (tmp_path / "out" / "real_features.png").stat().st_size > 10_000
    tip = results["random-4 tuned on the dev folds"]["tip"]["acc"]                  # {K: [per seed]}
    per_seed = [sum(tip[k][i] for k in tip) / len(tip) for i in range(len(real_features.SEEDS))]
    summary = next(line for line in text.splitlines() if line.startswith("| `tip` |"))  # the first table
    assert summary.split("|")[5].strip() == real_features.mean_std(per_seed)       # random-4 tuned column
    assert "| against | all | random-4 |" in text
    # --finished runs nothing: the finished blocks again, and a task not run yet named as such
    monkeypatch.setattr(real_features, "test_accuracy", lambda *a, **k: pytest.fail("--finished ran a unit"))
    real_features.main(["--file", str(path), "--tasks", "all", "random-5", "--rows", "zeroshot", "tip", "hegraph",
                        "--cache", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "again"), "--finished"])
    again = (tmp_path / "again" / "real_features.md").read_text()
    assert ("random-5 (5 classes, 40 images, 20 of them the test set), tuned on the dev folds**: not finished yet: "
            "`zeroshot`, `tip`, `hegraph`") in again
    chunks = text.split("\n\n")
    first = chunks[chunks.index("**all (6 classes, 48 images, 24 of them the test set), published defaults**") + 1]
    assert first in again.split("\n\n")                                  # a finished block's table, as before


def test_study_command_runs_the_designs_named(tmp_path, monkeypatch):
    path = tmp_path / "real.pt"
    torch.save(fake_real(C=4, per_class=8, d=8, assigned=False), path)
    monkeypatch.setattr(training, "train", lambda model, views, labels, recipe, seed, desc="": {})   # no training: fast
    monkeypatch.setattr(real_features, "SEEDS", (1, 2))
    monkeypatch.setattr(real_features, "DEV_FOLDS", 1)                    # the whole command, not its size
    real_features.main(["--file", str(path), "--study", "--tasks", "all", "--designs", "E2", "E1",
                        "--cache", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out")])
    rows = [line.split("|")[1].strip() for line in (tmp_path / "out" / "graph_study.md").read_text().splitlines()
            if line.startswith("| `")]
    assert rows == ["`hegraph-bias`", "`hegraph`", "`E2 sparse edges`", "`E1 own-class edges`"]


# -----------------------------------------------------------------------------
# no choice sees a test image

# the real file's class sizes: 489 classes of 7 images, 8 of 6, 1 of 5, 2 of 4 (3,484 images, 500 classes)
REAL_COUNTS = [7] * 489 + [6] * 8 + [5] + [4] * 2


def read_by_any_choice(real):
    """Per seed: the file's indices of every image a training draw, a dev fold or a search of any task, K or fold
    reads, and of every task's test set at every K (as task_data hands them to the runs)."""
    seen = {seed: set() for seed in real_features.SEEDS}
    tested = {seed: {} for seed in real_features.SEEDS}                   # seed -> {(task, K): test images}
    for task in real_features.TASKS:
        sub = real_features.subtask(real, real_features.task_classes(real, task))
        for seed in real_features.SEEDS:
            for shots in real_features.TEST_SHOTS:
                images = real_features.task_data(sub, shots, seed)["images"]
                seen[seed] |= set(images["train"].tolist())
                tested[seed][task, shots] = set(images["held_out"].tolist())
            for shots, fold in itertools.product(real_features.DEV_SHOTS, range(real_features.DEV_FOLDS)):
                images = real_features.task_data(sub, shots, seed, dev=True, fold=fold)["images"]
                seen[seed] |= set(images["train"].tolist()) | set(images["held_out"].tolist())
    return seen, tested


def check_disjoint(real):
    seen, tested = read_by_any_choice(real)
    labels = real["labels"]
    for seed in real_features.SEEDS:
        every_test = set().union(*tested[seed].values())
        assert every_test and not every_test & seen[seed], f"seed {seed}: test images read by a choice"
        for task in real_features.TASKS:                                  # one test set per task, whatever K
            assert len({frozenset(tested[seed][task, k]) for k in real_features.TEST_SHOTS}) == 1
        # the 500-class task's test set is every image outside the pool, POOL a class, the sub-tasks' a part of it
        whole = tested[seed]["imagenet-500", 1]
        assert all(tested[seed][task, 1] <= whole for task in real_features.TASKS)
        assert len(whole) == sum(max(0, n - real_features.POOL) for n in torch.bincount(labels).tolist())
        assert torch.equal(torch.bincount(labels[sorted(seen[seed])]), torch.full((len(real["classnames"]),),
                                                                                   real_features.POOL))
    assert seen[1] != seen[2]                                             # each seed draws its own pool


def test_no_test_image_is_read_by_any_choice_of_any_task_seed_k_or_fold():
    """A stand-in of the real file's shape (500 classes of 4 to 7 images, d = 512): over the four tasks, the seeds,
    K = 1, 2, 4 and the dev folds of K' = 1, 2, 3, no image of a test set is ever a training or a dev image, and
    the sub-tasks' test images are outside the 500-class dev pool."""
    check_disjoint(fake_real(counts=REAL_COUNTS, d=512))


@pytest.mark.skipif(not real_features.DEFAULT_FILE.is_file(), reason="the real features are not here")
def test_no_test_image_of_the_real_file_is_read_by_any_choice():
    check_disjoint(real_features.assign(torch.load(real_features.DEFAULT_FILE, weights_only=True)))


def test_a_class_smaller_than_the_pool_is_refused():
    with pytest.raises(SystemExit, match="class 1 has 3 images; the protocol needs at least 4"):
        fake_real(counts=[5, 3, 6])


def fake_blocks(tasks, rows, seeds=3):
    """Results of the tuned block, row i scoring 60 + i (so the last rows are the strongest), per K and seed."""
    return {(task, True): {row: {"acc": {k: [60.0 + i + k / 10 + s / 100 for s in range(seeds)]
                                         for k in real_features.TEST_SHOTS}, "point": {}, "epoch_seconds": 0,
                                 "params": 0, "dev": []} for i, row in enumerate(rows)} for task in tasks}


def test_the_figure_draws_hegraph_against_the_strongest_and_fits_its_title(tmp_path, drawn):
    """Ten methods on four tasks: HeGraphAdapter, the three strongest others and zero-shot are drawn, the rest are
    named under the panels (they are in the tables); with one task the title is not cut."""
    rows = list(real_features.ROWS)                     # hegraph-bias, hegraph, hegraph-tp are the last three
    blocks = fake_blocks(real_features.TASKS, rows)
    real_features.plot(blocks, tmp_path / "four.png", "ViT-B/32")
    fig = drawn[-1]
    for ax in fig.axes[:4]:   # in the tables' order: zero-shot, the three strongest but hegraph, and hegraph
        assert [bars.get_label() for bars in ax.containers] == ["zeroshot", "graphadapter", "hegraph-bias",
                                                                "hegraph", "hegraph-tp"]
    notes = fig.legends[0].get_title().get_text().replace("\n", " ")
    assert "Not drawn (the tables give them): linear-probe, tip, tip-f, taskres, clip-adapter." in notes
    real_features.plot(fake_blocks(["random-50"], rows), tmp_path / "one.png", "ViT-B/32")
    fig = drawn[-1]
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and "seeds 1, 2, 3" in fig._suptitle.get_text()
