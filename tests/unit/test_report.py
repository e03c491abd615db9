"""`weatherkd report`: runs that differ only in seed become one row with its spread, and paired
differences are taken image by image."""

import json

import numpy as np
import pytest
import yaml

from weatherkd import models
from weatherkd.commands import report
from weatherkd.engine.validate import summarise
from weatherkd.errors import UserError

KEYS = [("a", "snow"), ("b", "snow"), ("c", "rain_haze"), ("d", "rain_haze"), ("e", "rain_haze")]
IDENTITY = np.array([20.0, 21.0, 18.0, 19.0, 17.0])


def seed_or_0(seed):
    return seed or 0


def fake_eval(root, name, psnr, seed=None, objective="kd", removed=None):
    """An eval output as `weatherkd eval` writes it, with made-up per-image PSNRs (and, with
    ``removed``, every image's weather error cut to 1 - removed and 10 of damage per 100 untouched values)."""
    run = root / name
    models.save(models.build("residual_cnn", width=4, depth=2), run / "model")
    if seed is not None:
        (run / "config.yaml").write_text(yaml.safe_dump({"objective": objective, "seed": seed, "out_dir": str(run)}))
    rows = [{"key": k, "weather": w, "psnr": float(p), "ssim": 0.5, "id_psnr": float(i), "id_ssim": 0.4,
             "clean_psnr": 40.0 + seed_or_0(seed)} for (k, w), p, i in zip(KEYS, psnr, IDENTITY)]
    if removed is not None:
        for r in rows:
            r.update(se_weather=100.0 * (1 - removed), se_weather_input=100.0, se_untouched=10.0,
                     weather_values=30.0, untouched_values=100.0)
    ev = run / "eval"
    ev.mkdir()
    (ev / "samples.json").write_text(json.dumps(rows))
    (ev / "metrics.json").write_text(json.dumps({**summarise(rows, "rgb"), "model": str(run / "model"),
                                                 "shards": "s", "split": "test"}))
    return ev


def test_seeds_are_one_row_with_their_spread_and_differences_are_paired(tmp_path):
    rng = np.random.default_rng(0)
    kd = [IDENTITY + 1 + rng.normal(0, 0.3, 5) for _ in range(3)]
    dckd = [k + 0.5 + rng.normal(0, 0.1, 5) for k in kd]
    runs = [fake_eval(tmp_path, "teacher", IDENTITY + 2)]
    runs += [fake_eval(tmp_path, f"kd-s{s}", kd[s], seed=s) for s in (2, 0, 1)]  # any order
    runs += [fake_eval(tmp_path, f"dckd-s{s}", dckd[s], seed=s, objective="dckd") for s in range(3)]
    table = report.gather(runs, latency_size=16, diffs=[("dckd", "kd")])
    assert [r["name"] for r in table["rows"]] == ["identity", "teacher", "kd", "dckd"]

    def paper_mean(p):  # per weather first, then over weathers
        return np.mean([p[:2].mean(), p[2:].mean()])

    row = table["rows"][2]
    assert row["runs"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["mean"]["psnr"] == pytest.approx(np.mean([paper_mean(k) for k in kd]))
    assert row["std"]["mean"]["psnr"] == pytest.approx(np.std([paper_mean(k) for k in kd], ddof=1))
    assert row["weathers"]["snow"]["psnr"] == pytest.approx(np.mean([k[:2].mean() for k in kd]))

    diffs = {(d["a"], d["b"]): d for d in table["differences"]}
    assert set(diffs) == {("teacher", "identity"), ("kd", "identity"), ("dckd", "identity"), ("dckd", "kd")}
    d = diffs[("dckd", "kd")]
    per_image = np.mean(dckd, axis=0) - np.mean(kd, axis=0)
    # as the table's mean column: per weather first, then over the weathers
    assert d["mean"] == pytest.approx(paper_mean(per_image)) and d["n_images"] == 5
    se_snow, se_rain = (np.std(x, ddof=1) / np.sqrt(len(x)) for x in (per_image[:2], per_image[2:]))
    assert d["weathers"]["snow"]["se"] == pytest.approx(se_snow)
    assert d["se"] == pytest.approx(np.sqrt(se_snow**2 + se_rain**2) / 2)
    assert d["weathers"]["snow"]["mean"] == pytest.approx(per_image[:2].mean())
    per_seed = [paper_mean(a - b) for a, b in zip(dckd, kd)]
    assert d["per_seed"]["mean"] == pytest.approx(np.mean(per_seed))
    assert d["per_seed"]["std"] == pytest.approx(np.std(per_seed, ddof=1)) and d["per_seed"]["n"] == 3
    assert diffs[("teacher", "identity")]["mean"] == pytest.approx(2.0) and "per_seed" not in diffs[("teacher", "identity")]

    assert row["clean_in"]["psnr"] == pytest.approx(41.0) and row["std"]["clean_in"]["psnr"] == pytest.approx(1.0)
    assert table["rows"][1]["clean_in"] == {"psnr": 40.0, "weathers": {"rain_haze": 40.0, "snow": 40.0}, "min": 40.0}
    text = report.markdown(table)
    assert "clean-in PSNR" in text and "| 41.00 ± 1.00 |" in text
    assert "| model | n |" in text and f"{row['mean']['psnr']:.2f} ± {row['std']['mean']['psnr']:.2f}" in text
    assert f"| dckd − kd | **{d['mean']:+.2f}** ± {d['se']:.2f}" in text


def test_a_repeated_seed_an_unknown_diff_and_other_images_are_refused(tmp_path):
    a = fake_eval(tmp_path, "kd-s0", IDENTITY + 1, seed=0)
    b = fake_eval(tmp_path, "kd-again", IDENTITY + 1, seed=0)
    with pytest.raises(UserError, match="share a config and a seed"):
        report.gather([a, b], latency_size=16)
    with pytest.raises(UserError, match="no row named 'dckd'"):
        report.gather([a], latency_size=16, diffs=[("dckd", "kd-s0")])
    c = fake_eval(tmp_path, "other", IDENTITY + 2)
    rows = json.loads((c / "samples.json").read_text())
    (c / "samples.json").write_text(json.dumps([dict(r, key=r["key"] + "x") for r in rows]))
    with pytest.raises(UserError, match="not scored on the same images"):
        report.gather([a, c], latency_size=16, diffs=[("other", "kd-s0")])
    # One image of a weather has no standard error: null in the JSON, said in the table.
    one = report.paired_difference([{"a": ("snow", 2.0), "b": ("rain", 1.0), "c": ("rain", 3.0)}],
                                   [{"a": ("snow", 1.0), "b": ("rain", 1.0), "c": ("rain", 1.0)}], [None], [None])
    assert one["weathers"]["snow"]["se"] is None and one["se"] is None and one["mean"] == pytest.approx(1.0)


def test_removal_and_damage_are_averaged_over_seeds_and_tabled(tmp_path):
    runs = [fake_eval(tmp_path, f"kd-s{s}", IDENTITY + 1, seed=s, removed=0.2 + 0.2 * s) for s in range(3)]
    runs.append(fake_eval(tmp_path, "teacher", IDENTITY + 2, removed=-0.1))
    table = report.gather(runs, latency_size=16)
    kd = next(r for r in table["rows"] if r["name"] == "kd")
    assert kd["removal"]["snow"]["removed"] == pytest.approx(0.4)  # 0.2, 0.4, 0.6
    assert kd["removal"]["snow"]["untouched_psnr"] == pytest.approx(10 * np.log10(255**2 / 0.1))
    assert kd["removal"]["snow"]["weather_pixels"] == pytest.approx(30 / 130)
    text = report.markdown(table)
    assert "| kd | 40% / 58.1 dB | 40% / 58.1 dB |" in text and "| teacher | -10% / 58.1 dB |" in text
    assert "identity |" not in text.split("Removal and damage")[1].split("Paired")[0]


def test_a_key_added_since_a_run_was_saved_takes_its_default_when_grouping(tmp_path):
    """A seed saved before `pixel` existed is the same method as one saved with its default."""
    runs = [fake_eval(tmp_path, f"kd-s{s}", IDENTITY + 1, seed=s) for s in range(3)]
    for s, pixel in ((1, "l1"), (2, "l2")):
        config = tmp_path / f"kd-s{s}" / "config.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "pixel": pixel}))
    rows = report.gather(runs, latency_size=16)["rows"]
    assert [(r["name"], r.get("seeds")) for r in rows[1:]] == [("kd", [0, 1]), ("kd-s2", None)]


def test_each_photo_shows_a_models_worst_weather_and_clean_in_averaged_over_seeds(tmp_path, monkeypatch):
    origins = {"a": "p1", "c": "p1", "b": "p2", "d": "p2", "e": "p2"}
    # Per seed, per photo (snow, rain): seed 0 p1 (+1, +3), p2 (-2, +1); seed 1 p1 (+4, +1), p2 (-1, +2).
    gains = [np.array([1.0, -2.0, 3.0, 0.5, 1.5]), np.array([4.0, -1.0, 1.0, 1.5, 2.5])]
    runs = [fake_eval(tmp_path, f"kd-s{s}", IDENTITY + gains[s], seed=s) for s in range(2)]
    for ev in runs:
        rows = json.loads((ev / "samples.json").read_text())
        (ev / "samples.json").write_text(json.dumps([dict(r, origin=origins[r["key"]]) for r in rows]))
    table = report.gather(runs, latency_size=16)
    photos = table["rows"][1]["photos"]
    # The weathers are averaged over seeds first: p1's worst is rain (+2.0), though each seed's worst was +1.
    assert photos["p1"] == {"worst_weather": "rain_haze", "worst_gain": pytest.approx(2.0), "clean_in": pytest.approx(40.5)}
    assert photos["p2"]["worst_weather"] == "snow" and photos["p2"]["worst_gain"] == pytest.approx(-1.5)
    assert "| p2 | -1.50 snow / 40.5 |" in report.markdown(table)
    monkeypatch.setattr(report.photos, "MAX_PHOTOS", 1)  # an ingested set names every image: one row each is no summary
    assert "photos" not in report.gather(runs, latency_size=16)["rows"][1]
    monkeypatch.undo()
    # Seeds scored on other photos, or an image not named by its photo: no per-photo figures.
    rows = json.loads((runs[1] / "samples.json").read_text())
    (runs[1] / "samples.json").write_text(json.dumps([rows[0] | {"origin": "p3"}, *rows[1:]]))
    assert "photos" not in report.gather(runs, latency_size=16)["rows"][1]
    (runs[1] / "samples.json").write_text(json.dumps([rows[0] | {"origin": ""}, *rows[1:]]))
    assert "photos" not in report.gather(runs, latency_size=16)["rows"][1]


def test_a_config_several_stages_could_read_is_read_as_the_closest_one():
    """The teacher's config reads a saved VQ config too; it must not fill it with a teacher's keys."""
    from weatherkd import config as cfgmod
    from weatherkd.recipes import vq

    saved = cfgmod.to_dict(vq.Config())
    assert report._as_this_code_reads_it(saved) == saved
