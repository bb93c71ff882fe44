"""Published numbers as cited rows: the shipped CSVs hold exactly what the sources state, and a bad CSV is
one line naming the file, the line and the field."""

from pathlib import Path

import pytest

from bench.errors import UsageError
from bench.report import published

SHIPPED = Path(__file__).resolve().parents[1] / "results" / "published"
HEADER = "method,dataset,backbone,metric,values,epochs,source"

# Typed in from the sources (L2W-DEN README table; MSDNet-PyTorch issue 10; MetaGF README), not read from the CSVs.
EXPECTED = {
    ("l2w", "msdnet-imagenet-step4", 100): [59.54, 67.22, 71.03, 72.33, 73.93],
    ("l2w", "msdnet-imagenet-step4", 300): [61.64, 67.89, 71.61, 73.82, 75.03],
    ("l2w", "msdnet-imagenet-step6", 100): [60.05, 69.13, 73.33, 75.19, 76.30],
    ("l2w", "msdnet-imagenet-step6", 300): [61.41, 70.70, 74.38, 75.80, 76.66],
    ("l2w", "msdnet-imagenet-step7", 100): [59.24, 69.65, 73.94, 75.66, 76.72],
    ("l2w", "msdnet-imagenet-step7", 300): [60.94, 71.88, 75.13, 76.03, 76.82],
    ("uniform", "msdnet-imagenet-step7", 90): [62.896, 70.316, 73.000, 73.594, 74.592],
    ("cagrad", "msdnet (5 exits; configuration not stated)", None): [58.37, 64.21, 66.88, 68.22, 69.42],
}


def test_shipped_rows_are_the_sources_numbers():
    rows = published.read_all([SHIPPED])
    got = {(r.method, r.backbone, r.epochs): r.numbers() for r in rows}
    assert got == EXPECTED
    assert all(r.dataset == "imagenet" and r.metric == "top1_per_exit" and r.source for r in rows)
    # the source's own digits are kept for display (73.000, not 73.0)
    assert "73.000" in published.markdown(rows)


def test_markdown_labels_rows_as_not_run_here():
    text = published.markdown(published.read_all([SHIPPED]))
    assert "## Published results (not run here)" in text
    body = [line for line in text.splitlines() if line.startswith("| l2w")]
    assert len(body) == 6 and all("(published)" in line and "L2W-DEN README" in line for line in body)
    assert published.markdown([]) == ""


@pytest.mark.parametrize("csv_text, message", [
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_per_exit,59.54 / 67.22,100,", "line 2: source"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_per_exit,59.54 / sixty,100,src", "line 2: values: 'sixty' is not a number"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_per_exit,59.54 / 167.2,100,src", "167.2 is not an accuracy in [0, 100]"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_per_exit,nan,100,src", "nan is not an accuracy"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top5,59.5,100,src", "line 2: metric: unknown metric 'top5'"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_last,59.5,-3,src", "line 2: epochs"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_last,59.5,100", "line 2: expected 7 fields"),
    (f"{HEADER}\nl2w,imagenet,msdnet,top1_last,59.5,100,a,b", "line 2: expected 7 fields"),
    ("method,dataset,backbone,metric,values,epochs\nl2w,imagenet,msdnet,top1_last,59.5,100",
     "missing column(s) source"),
    (f"{HEADER},notes\n", "unknown column(s) notes"),
    (f"{HEADER}\n", "no rows"),
    (f"{HEADER}\n,imagenet,msdnet,top1_last,59.5,100,src", "line 2: method"),
])
def test_bad_csv_is_one_line(tmp_path, csv_text, message):
    path = tmp_path / "pub.csv"
    path.write_text(csv_text)
    with pytest.raises(UsageError) as err:
        published.read(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        published.read_all([tmp_path / "nope.csv"])
    with pytest.raises(UsageError, match=r"no \*\.csv files"):
        published.read_all([tmp_path])


def test_pipe_in_source_does_not_split_the_row(tmp_path):
    path = tmp_path / "pub.csv"
    path.write_text(f'{HEADER}\nx,d,b,top1_last,50.5,10,"Paper | Table 2"\n')
    line = [row for row in published.markdown(published.read(path)).splitlines() if row.startswith("| x")][0]
    assert line.count(" | ") == 5 and "Paper \\| Table 2" in line


def _store(root: Path) -> Path:
    from bench.results import ResultRecord, write

    for seed in range(2):
        config = {"data": {"name": "digits"}, "backbone": {"name": "tiny"}, "method": {"name": "uniform"},
                  "seed": seed}
        write(ResultRecord(
            trial_id=f"uniform-s{seed}", config=config, seed=seed, counter="fvcore", calibration="heldout",
            exits=[{"exit": k + 1, "top1": 80.0 + k + seed, "top5": 100.0, "macs": 1e6 * (k + 1), "params": 10}
                   for k in range(2)],
            budgets=[{"p": 1, "test_acc": 81.0 + seed, "val_acc": 81.0, "expected_macs": 1.5e6,
                      "exit_fractions": [0.5, 0.5], "thresholds": [0.9, None]}]), root)
    return root


def test_leaderboard_shows_published_rows_apart(tmp_path, run_cli):
    sweep = _store(tmp_path / "sweep")
    code, out, err = run_cli("leaderboard", sweep, "--out", tmp_path / "board", "--published", SHIPPED)
    assert code == 0, err
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    own, cited = board.split("## Published results (not run here)")
    assert "uniform" in own and "published" not in own  # own rows first, unlabelled as published
    assert "62.896" in cited and "LeapLabTHU/L2W-DEN README" in cited
    # cited numbers never enter the statistics: the CSV table equals a leaderboard without them
    run_cli("leaderboard", sweep, "--out", tmp_path / "plain")
    assert (tmp_path / "board" / "leaderboard.csv").read_text() == (tmp_path / "plain" / "leaderboard.csv").read_text()


def test_leaderboard_rejects_a_bad_published_file_before_writing(tmp_path, run_cli):
    sweep = _store(tmp_path / "sweep")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{HEADER}\nl2w,imagenet,msdnet,top1_per_exit,59.54 / 67.22,100,\n")
    code, out, err = run_cli("leaderboard", sweep, "--out", tmp_path / "board", "--published", bad)
    assert code == 2 and err.count("\n") == 1 and "line 2: source" in err
    assert not (tmp_path / "board").exists()
