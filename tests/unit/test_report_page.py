"""`weatherkd report`'s page, looked at as a person would: it parses, every picture in it opens,
the frontier has one point per model, and the grid of restorations has a row per chosen test image
and a column per model. Made-up evaluations of tiny registry models on a tiny shard set; in process."""

import base64
import io
import json
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's make_set
from conftest import make_set  # noqa: E402

from weatherkd import cli, models  # noqa: E402
from weatherkd.commands import report  # noqa: E402
from weatherkd.commands.report import figures as report_figures  # noqa: E402
from weatherkd.engine.validate import summarise  # noqa: E402

WEATHERS = ("rain_haze", "snow")


def fake_model(root, name, seed=None, width=4):
    run = root / name
    models.save(models.build("residual_cnn", width=width, depth=2), run / "model", extra={"random_init": True})
    if seed is not None:
        (run / "config.yaml").write_text(yaml.safe_dump({"objective": "kd", "seed": seed, "out_dir": str(run)}))
    return run / "model"


def fake_eval(root, model_dir, shards, gain):
    """An eval output as `weatherkd eval` writes it, with made-up per-image PSNRs on ``shards``' test keys."""
    name = model_dir.parent.name
    rng = np.random.default_rng(zlib.crc32(f"{name}{shards}".encode()))
    # With the removal split (metrics.weather_split's sums): a model taking away ``gain``/10 of
    # the weather's squared error, a quarter of the pixels weather, the rest left near exact.
    rows = [{"key": f"test_{w}_{i:04d}", "weather": w, "psnr": 20.0 + gain + rng.normal(0, 0.2), "ssim": 0.5,
             "id_psnr": 20.0 + i * 0.1, "id_ssim": 0.4, "clean_psnr": 45.0,
             "se_weather": 1000.0 * (1 - gain / 10), "se_weather_input": 1000.0, "se_untouched": 3.0,
             "weather_values": 300.0, "untouched_values": 900.0} for w in WEATHERS for i in range(3)]
    ev = root / "evals" / Path(shards).name / name
    ev.mkdir(parents=True)
    (ev / "samples.json").write_text(json.dumps(rows))
    (ev / "metrics.json").write_text(json.dumps({**summarise(rows, "rgb"), "model": str(model_dir),
                                                 "shards": str(shards), "split": "test"}))
    return ev


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.figures, self.text = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self.tables += 1
        elif tag == "figure":
            self.figures.append(attrs.get("id"))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    """A report of three rows (one with two seeds) on a test set and a held-out set."""
    root = tmp_path_factory.mktemp("report")
    sets = {}
    for label, seed in (("test-set", 0), ("held-set", 1)):
        sets[label] = root / label
        make_set(sets[label], {("test", w): 3 for w in WEATHERS}, size=24, weathers=WEATHERS, seed=seed)

    gains = {fake_model(root, "teacher", width=8): 1.0, fake_model(root, "kd-s0", seed=0): 0.5,
             fake_model(root, "kd-s1", seed=1): 0.6, fake_model(root, "scratch"): 0.2}
    main, held = ([fake_eval(root, m, sets[s], g) for m, g in gains.items()] for s in ("test-set", "held-set"))
    table = report.gather(main, latency_size=16)
    table["heldout"] = report.gather(held, latency_size=16)
    return root, table


def test_the_page_parses_its_images_open_and_the_figures_hold_what_they_should(made_up, tmp_path):
    root, table = made_up
    out = tmp_path / "report.md"
    figures = report.write(table, report.document(table), out, figures_to=tmp_path / "figures")
    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    page.close()
    assert json.loads(out.with_suffix(".json").read_text())["shards"] == str(root / "test-set")

    # Every picture is inline and decodes; the page needs nothing else.
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
    assert page.figures == ["frontier", "gains", "grid", "grid-heldout", "clean-in"]
    assert page.tables == 6  # the table, removal and damage, and the paired differences, for each set
    text = " ".join(page.text)
    assert text.count("Removal and damage, per weather") == 2
    # The teacher took away a tenth of the weather's squared error and left the rest at MSE 1/300.
    assert "10% / 72.9 dB" in text
    assert "±" in text  # the seeded row's spread
    assert "kd − identity" in text

    drawn = {d.name: d for d in figures}
    # The frontier: one point per model on each panel, error bars only where a row has seeds.
    names = ["teacher", "kd", "scratch"]
    for label in ("test", "held-out"):
        points = drawn["frontier"].data[label]["points"]
        assert [p["name"] for p in points] == names
        assert [p["std"] is not None for p in points] == [False, True, False]
    axes = drawn["frontier"].figure.axes
    assert len(axes) == 4  # GFLOPs and latency, for the test and the held-out set
    assert all(len(ax.containers) == len(names) for ax in axes)  # one errorbar artist per model
    assert all(any(ln.get_linestyle() == "--" for ln in ax.get_lines()) for ax in axes)  # identity's line
    # The gains: one bar per model and per weather (and the mean), with their paired SEs.
    bars = drawn["gains"].data["test"]["bars"]
    assert [b["name"] for b in bars] == names and all(set(b["weathers"]) == set(WEATHERS) for b in bars)
    # The grid: two images per weather; input | each model | ground truth; a whole and a crop row each.
    for name, prefix in (("grid", "test"), ("grid-heldout", "test")):
        grid = drawn[name].data
        assert grid["columns"] == ["input", *names, "ground truth"]
        assert len(grid["rows"]) == 2 * len(WEATHERS)
        assert [r["label"].split("\n")[0] for r in grid["rows"]] == [w for w in WEATHERS for _ in range(2)]
        assert all(t.endswith(" dB") for r in grid["rows"] for t in r["texts"][:-1])
        assert len(drawn[name].figure.axes) == 2 * len(grid["rows"]) * len(grid["columns"])
    # The same choice every time: the grid is seeded.
    again = report_figures.choose(root / "test-set", "test")
    assert [s["key"] for s in again] == [r["label"].split("\n")[1] for r in drawn["grid"].data["rows"]]
    assert drawn["clean-in"].data["columns"] == ["clean input", *names]
    assert len(drawn["clean-in"].data["rows"]) == 2  # a clean photo from each set
    # ...and the PNGs the README shows.
    for d in figures:
        assert Image.open(tmp_path / "figures" / f"{d.name}.png").size[0] > 300


def test_a_report_json_is_redrawn_and_a_missing_set_is_said_not_drawn(made_up, tmp_path):
    _, table = made_up
    source = tmp_path / "old" / "report.json"
    source.parent.mkdir()
    source.write_text(json.dumps({**table, "heldout": None, "shards": str(tmp_path / "gone")}))
    code = cli.main(["report", str(source), "--figures-to", str(tmp_path / "png"), "--tracker", "none"])
    assert code == 0
    page = (tmp_path / "old" / "report.html").read_text()
    assert "No test restorations" in page and "gone" in page
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["frontier.png", "gains.png"]
