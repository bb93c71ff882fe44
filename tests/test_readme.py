"""Every code snippet of the README and of the documentation pages (docs/*.md) runs as shown: python examples
(in fresh registries, so nothing leaks), YAML blocks validated as trial or sweep configs, and shell blocks executed
command by command with tiny settings where they would train or read data (`exitbench` in-process, in a temporary
folder). Each snippet is named by its page and line (`docs/sweeps.md:57`).

A shell block that must not run here (it starts a cluster, installs, or runs the whole suite) is marked on the
line before its fence with `<!-- readme: no-run (why) -->`; such marks are few (across all pages) and each gives
its reason.

Every relative link of those pages resolves: `[text](path)` names an existing file or folder of the repository
(relative to the page), and `[text](page.md#anchor)` or `[text](#anchor)` a heading of that page (GitHub's slug)."""

import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import yaml

import bench.config  # noqa: F401  (bound to the real registries before the examples swap in fresh ones)
from bench import registry
from bench.registry import Registry, load_all

load_all()

ROOT = Path(__file__).resolve().parents[1]
# The README and every documentation page, by their path in the repository ("README.md", "docs/methods.md").
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text()
         for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README = PAGES["README.md"]
FENCE = re.compile(r"^(?: *(?P<mark><!-- readme: no-run \((?P<why>[^)]*)\) -->)\n)?(?P<indent> *)```(?P<lang>[a-z]*)\n"
                   r"(?P<body>.*?)^(?P=indent)```", flags=re.S | re.M)
# (where, lang, body, why): `where` is the page and the line of the snippet's fence, e.g. "docs/sweeps.md:57".
SNIPPETS = [(f"{page}:{text.count(chr(10), 0, m.start('indent')) + 1}", m["lang"],
             re.sub(rf"(?m)^{m['indent']}", "", m["body"]), m["why"])
            for page, text in PAGES.items() for m in FENCE.finditer(text)]
BLOCKS = [(where, body) for where, lang, body, _ in SNIPPETS if lang == "python"]
MAX_NO_RUN = 3  # across the README and every docs page together
# Tiny settings: every command that would train or read a dataset runs on small synthetic data, one epoch.
TINY_DATA = ["data=synthetic", "data.num_classes=10", "data.image_size=32", "data.train_size=32",
             "data.test_size=16", "data.val_size=0.25", "batch_size=16", "device=cpu"]
TINY_TRAIN = ["epochs=1", "progress=false", *TINY_DATA]


def test_readme_extension_examples_run(monkeypatch):
    assert len(BLOCKS) == 3, [where for where, _ in BLOCKS]
    fresh = {"METHODS": Registry("method"), "BACKBONES": Registry("backbone"), "DATASETS": Registry("dataset")}
    for name, reg in fresh.items():
        monkeypatch.setattr(registry, name, reg)
    (method_at, method_src), (backbone_at, backbone_src), (dataset_at, dataset_src) = BLOCKS
    exec(compile(backbone_src, f"{backbone_at}-backbone", "exec"), {})
    model = fresh["BACKBONES"].build("mine-wide", num_classes=5)
    assert [z.shape for z in model(torch.randn(2, 3, 16, 16))] == [(2, 5), (2, 5)]

    exec(compile(method_src, f"{method_at}-method", "exec"), {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = fresh["METHODS"].build("focal", {"gamma": 1.0}, model=model, optimizer=opt, total_steps=1)
    out = strategy.step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), 0)
    assert out.count == 4 and out.exit_losses.shape == (2,)

    prelude = "from bench.datasets import DataParams, Splits, heldout_split\n" \
              "from pydantic import Field\nimport torch\nfrom torch.utils.data import Subset, TensorDataset\n" \
              "from bench.registry import DATASETS\n"
    exec(compile(prelude + dataset_src, f"{dataset_at}-dataset", "exec"), {"__name__": "readme"})
    splits = fresh["DATASETS"].get("mine").factory(fresh["DATASETS"].params("mine", {"val_size": 0.2}), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 200)


def _ids(langs: tuple[str, ...], run_only: bool = False) -> list:
    """The indices of SNIPPETS in those languages (without the no-run ones), each with its page:line as test id."""
    return [pytest.param(i, id=where) for i, (where, lang, _, why) in enumerate(SNIPPETS)
            if lang in langs and not (run_only and why is not None)]


def test_snippets_come_from_the_readme_and_the_docs():
    pages = {where.rpartition(":")[0] for where, *_ in SNIPPETS}
    assert "README.md" in pages and any(page.startswith("docs/") for page in pages), pages


@pytest.mark.parametrize("index", _ids(("yaml",)))
def test_readme_yaml_blocks_are_valid_configs(index):
    from bench.config import is_sweep, validate_sweep, validate_trial

    where, _, body, _ = SNIPPETS[index]
    raw = yaml.safe_load(body)
    assert isinstance(raw, dict), (where, body)
    validate_sweep(raw) if is_sweep(raw) else validate_trial(raw)  # a ConfigError names the bad field


def test_no_run_marks_are_few_and_give_reasons():
    marked = [(where, why) for where, _, _, why in SNIPPETS if why is not None]
    assert len(marked) <= MAX_NO_RUN and all(why.strip() for _, why in marked), marked


def commands(body: str) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments dropped)."""
    return [words for line in body.replace("\\\n", " ").splitlines()
            if (words := shlex.split(line, comments=True))]


def without_data(args: list[str]) -> list[str]:
    return [a for a in args if not re.match(r"(data|device|batch_size)(\.|=)", a)]


def reference_checkpoint(path: Path, args: list[str]) -> None:
    """A stand-in for a downloaded reference checkpoint: the named backbone, in MSDNet-PyTorch's format."""
    from bench.config import apply_overrides, validate_trial
    from bench.registry import BACKBONES

    spec = dict(validate_trial(apply_overrides({}, [a for a in args if "=" in a])).backbone)
    model = BACKBONES.build(spec.pop("name"), spec, num_classes=10, in_channels=3, image_size=32)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


def tiny(args: list[str], cwd: Path) -> list[str]:
    """The command with tiny settings where it would train or read data; files it names are made first."""
    command, rest = args[0], args[1:]
    if command == "train":
        return [command, *without_data(rest), *TINY_TRAIN]
    if command == "evaluate":
        if not (cwd / rest[0]).exists():
            reference_checkpoint(cwd / rest[0], rest[1:])
        return [command, *without_data(rest), *TINY_DATA]
    if command == "latency":
        return [command, *rest, "--limit", "20", "--budgets", "1", "39", "--threads", "1"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("index", _ids(("bash", "sh", "shell"), run_only=True))
def test_readme_shell_blocks_run(index, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where, _, body, _ = SNIPPETS[index]
    for args in commands(body):
        assert args[0] == "exitbench", (f"the shell block at {where} runs {args[0]!r}: only exitbench commands run "
                                        f"here; mark the block <!-- readme: no-run (why) --> if it must not run")
        code, out, err = run_cli(*tiny(args[1:], tmp_path))
        assert code == 0, (where, shlex.join(args), err)


# ---------------------------------------------------------------- links between the pages


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def unfenced(text: str) -> str:
    """The page without its fenced code blocks (whose `#` lines are no headings and brackets no links)."""
    return re.sub(r"(?ms)^ *(`{3,})[^\n]*\n.*?^ *\1[ \t]*$", "", text)


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans."""
    return re.sub(r"(`+)(?!`).+?(?<!`)\1(?!`)", "", unfenced(text), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor on a page (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"(?m)^#{1,6}[ \t]+(.+?)[ \t#]*$", unfenced(text)):
        base = slug(heading)
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(page: Path, root: Path) -> list[str]:
    """Every relative link of the page that names no existing path under root, or no heading of its page."""
    text = page.read_text()
    broken = []
    for m in LINK.finditer(prose(text)):
        target = m["target"]
        if re.match(r"(?i)(https?:|mailto:)", target):
            continue
        path, _, anchor = unquote(target).partition("#")
        where = f"{page.relative_to(root).as_posix()}: ({target})"
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(root.resolve()) or not file.exists():
            broken.append(f"{where}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{where}: no heading #{anchor} in {file.relative_to(root.resolve()).as_posix()}")
    return broken


@pytest.mark.parametrize("page", list(PAGES))
def test_relative_links_resolve(page):
    assert broken_links(ROOT / page, ROOT) == []


def test_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Plugins: out-of-tree components\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# A page\n\n## Weights & Biases, `MLflow`\n\n"
                    "[ok](other.md#plugins-out-of-tree-components) [ok](#weights--biases-mlflow) [ok](../bench) "
                    "[ok](https://example.org/x#y) ![ok](other.md) [ok](#a-page)\n"
                    "[bad](missing.md) [bad](other.md#plugins) [bad](#nowhere) [bad](bench/x.py) "
                    "[bad](../../outside.md)\n\n"
                    "`[code](missing.md)` and\n\n```md\n[fenced](missing.md)\n```\n")
    broken = broken_links(page, tmp_path)
    assert [b.split(": ")[1] for b in broken] == ["(missing.md)", "(other.md#plugins)", "(#nowhere)", "(bench/x.py)",
                                                  "(../../outside.md)"], broken
    assert "no heading #plugins in docs/other.md" in broken[1] and "no such file" in broken[0]


def test_slugs_follow_github():
    assert slug("Reference checkpoints and fine-tuning (`init`)") == "reference-checkpoints-and-fine-tuning-init"
    assert slug("Logs: TensorBoard, Weights & Biases, MLflow") == "logs-tensorboard-weights--biases-mlflow"
    assert slug("Distributed trials: one trial on several GPUs (Ray Train, DDP)") == \
        "distributed-trials-one-trial-on-several-gpus-ray-train-ddp"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_every_docs_page_is_listed_in_the_readme_and_the_docs_index():
    pages = [page.removeprefix("docs/") for page in PAGES if page.startswith("docs/") and page != "docs/README.md"]
    assert pages, "no documentation pages"
    index = PAGES["docs/README.md"]
    assert [p for p in pages if f"]({p})" not in index] == [], "docs/README.md lists every page"
    assert [p for p in pages if f"](docs/{p})" not in README] == [], "README.md links every docs page"
    assert "](docs/README.md)" in README


def test_readme_stays_a_quick_start():
    """The README is what a newcomer needs in a few screens; everything else has its page under docs/."""
    size = len(README.encode())
    assert size < 15_000, f"README.md is {size} bytes: move the details to a page under docs/"
