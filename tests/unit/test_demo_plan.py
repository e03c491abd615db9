"""The demo's plan, in process: which stages run, in which order, with which arguments."""

import json

import pytest

from weatherkd.commands import demo


def test_the_plan_chains_every_stage_and_sd_path_adds_the_d4ir_student(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    plan = {s.name: s for s in demo.pipeline(out, shards)}
    names = list(plan)
    assert names[:7] == ["shards", "teacher", "cache-teacher", "vq", "distill-scratch", "distill-kd", "distill-dckd"]
    taught = out / "taught-shards"
    assert f"teacher={out / 'teacher' / 'model'}" in plan["cache-teacher"].argv and f"out_dir={taught}" in plan["cache-teacher"].argv
    for student in ("distill-kd", "distill-dckd"):  # from the cache, scored on the real test split
        assert f"data.train_shards={taught}" in plan[student].argv and f"data.eval_shards={shards}" in plan[student].argv
    assert f"data.train_shards={taught}" not in plan["distill-scratch"].argv
    assert "adapter" not in names and names[-3:] == ["heldout", "eval", "eval-heldout"]
    evaluated = [d.parent.name for d in plan["eval"].done]
    assert evaluated == ["teacher", "distill-scratch", "distill-kd", "distill-dckd", "distill-dream", "prune",
                         "distill-pruned"]
    # the same models on the held-out check: other photos, another generator
    heldout = tmp_path / "shards-heldout"
    assert plan["heldout"].argv[:3] == ["weatherkd", "shards", "heldout"] and str(heldout) in plan["heldout"].argv
    assert f"{heldout}" in plan["eval-heldout"].argv and str(out / "eval-heldout") in plan["eval-heldout"].argv
    assert [d.parent.name for d in plan["eval-heldout"].done] == evaluated
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))
    stages = {s.name: s for s in demo.pipeline(out, shards, sd_path=tmp_path / "sd")}
    assert "prompt.width=32" in stages["adapter"].argv
    synth = " ".join(stages["synth"].argv)
    assert f"sd_path={tmp_path / 'sd'}" in synth and f"adapter={out / 'adapter' / 'model'}" in synth
    d4ir = stages["distill-d4ir"]
    assert "objective=kd" in d4ir.argv and f"data.train_shards={out / 'd4ir-shards'}" in d4ir.argv
    assert stages["eval"].done[-1] == out / "eval" / "distill-d4ir" / "metrics.json" and d4ir.progress == out / "distill-d4ir" / "progress.json"
    kd = stages["distill-kd"]
    assert "configs/distill/demo.yaml" in kd.argv and "objective=kd" in kd.argv and kd.steps > 0


def test_seeds_train_each_student_again_and_evaluate_every_run(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    one = demo.pipeline(out, shards)
    three = {s.name: s for s in demo.pipeline(out, shards, seeds=3)}
    assert [s.name for s in one] == [n for n in three if not n.endswith(("-s1", "-s2"))]  # seed 0 is the default run
    for student in ("distill-scratch", "distill-kd", "distill-dckd", "distill-dream", "distill-pruned"):
        assert not any(a.startswith("seed=") for a in three[student].argv)
        for s in (1, 2):
            stage = three[f"{student}-s{s}"]
            assert f"seed={s}" in stage.argv and f"out_dir={out / f'{student}-s{s}'}" in stage.argv
            assert stage.done == (out / f"{student}-s{s}" / "metrics.json",)
    assert sum(n.startswith("teacher") or n == "prune" or n == "dream" for n in three) == 3  # made once
    evaluated = [d.parent.name for d in three["eval"].done]
    assert len(evaluated) == 1 + 5 * 3 + 1 and "distill-kd-s2" in evaluated


def test_a_failed_stage_shows_its_cause_above_the_launchers_summary():
    summary = [f"  |   rank      : {r} ... traceback : Signal 6 (SIGABRT) received" for r in range(20)]
    earlier = "# 2026-12-01 10:00:00  weatherkd vq\nerror: vq: an older run's failure\n"
    log = (earlier + "\n# 2026-12-03 16:13:30  accelerate launch -m weatherkd distill\n"
           "step 1\n[rank 1] error: distill: teacher missing\nterminate called without an active exception\n"
           + "\n".join(summary) + "\n")
    shown = demo.failure_lines(log, tail=15)
    assert shown[:2] == ["[rank 1] error: distill: teacher missing", "terminate called without an active exception"]
    assert shown[2] == "..." and shown[3:] == summary[-15:]
    assert not any("older run" in ln for ln in shown)
    assert demo.failure_lines("\n# 2026-12-03 16:13:30  x\nonly line\n") == ["only line"]
    assert demo.failure_lines("no header\nerror: x\n") == ["no header", "error: x"]


def test_the_checklist_states_each_target_met_or_failed_with_its_figure():
    from weatherkd.commands.report.targets import checklist

    def diff(a, b, mean, weathers, se=0.05, seed_sd=None):
        d = {"a": a, "b": b, "mean": mean, "se": se, "weathers": {w: {"mean": m} for w, m in weathers.items()}}
        if seed_sd is not None:
            d["per_seed"] = {"std": seed_sd}
        return d

    def row(name, psnr, clean_in=None):
        return {"name": name, "mean": {"psnr": psnr}, **({"clean_in": {"psnr": clean_in}} if clean_in else {})}

    table = {"rows": [row("identity", 18.0), row("teacher", 20.0, 40.0), row("distill-scratch", 19.5, 50.0),
                      row("distill-kd", 19.7, 34.0)],
             "differences": [diff("teacher", "identity", 2.0, {"snow": 1.0, "rain_haze": 3.0}),
                             diff("distill-kd", "distill-scratch", 0.2, {"snow": 0.2}, se=0.05, seed_sd=0.15)],
             "targets": {"dream_share_of_kd_gain": 0.6, "pruned_flops_cut": 0.45, "pruned_psnr_drop": 0.7}}
    heldout = {"differences": [diff("teacher", "identity", 0.4, {"snow": -0.6, "raindrop": 1.4})]}
    got = checklist(table, heldout)
    assert [(c["target"].split(" ")[0], c["met"]) for c in got] == [
        ("teacher", True),  # +2.00 mean, worst weather +1.00
        ("teacher", True),  # beats scratch by 0.5
        ("kd", False),  # 0.2 dB is within 2 SD over seeds (0.15)
        ("dreamed", True), ("pruned", False),  # 45% fewer FLOPs, but 0.7 dB below the teacher
        ("held-out:", False), ("held-out:", False),  # +0.4 mean; snow -0.6
        ("clean-in", False)]  # kd 34 dB
    assert got[2]["figure"] == "+0.20 dB, SE 0.05, seed SD 0.15"
    one_seed = {**table, "differences": [*table["differences"][:1],
                                         diff("distill-kd", "distill-scratch", 0.9, {"snow": 0.9}, se=0.05)]}
    kd = checklist(one_seed, heldout)[2]
    assert not kd["met"] and kd["figure"] == "+0.90 dB, SE 0.05, no paired seeds (run --seeds 3 for the SD)"
    assert got[-1]["figure"] == "lowest distill-kd 34.0 dB" and got[-2]["figure"] == "worst teacher -0.60 dB"


def test_the_evidence_preset_adds_the_consistency_rows_three_seeds_and_longer_runs(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    default = {s.name: s for s in demo.pipeline(out, shards)}
    evidence = {s.name: s for s in demo.pipeline(out, shards, demo.EVIDENCE)}
    rows = ["scratch", "kd", "dckd", "kd-cons", "dckd-cons"]
    for row in rows:
        for name in (f"distill-{row}", f"distill-{row}-s1", f"distill-{row}-s2"):
            assert name in evidence and evidence[name].steps > default["distill-kd"].steps
    assert "consistency.objectives=[kd]" in evidence["distill-kd-cons-s2"].argv
    assert "objective=dckd" in evidence["distill-dckd-cons"].argv
    assert not any(a.startswith("consistency.") for a in evidence["distill-dckd-s1"].argv)
    assert evidence["teacher"].steps > default["teacher"].steps
    for stage in ("distill-dream-s2", "distill-pruned-s1"):
        assert evidence[stage].steps == evidence["distill-kd"].steps
    assert [d.parent.name for d in evidence["eval"].done][:4] == ["teacher", *(f"distill-scratch{s}" for s in ("", "-s1", "-s2"))]
    assert ("distill-dckd-cons", "distill-kd") in demo.EVIDENCE.diffs
    # `--seeds` still overrides the preset's
    assert "distill-kd-s1" not in {s.name for s in demo.pipeline(out, shards, demo.EVIDENCE, seeds=1)}


def test_a_shard_set_an_older_synth_made_otherwise_is_refused_by_name(tmp_path):
    from weatherkd.data.photo_set import SynthSpec, build
    from weatherkd.errors import UserError

    shards = tmp_path / "shards"
    demo.check_shard_set(shards)  # nothing built yet: the demo builds it
    build(str(shards), "builtin", SynthSpec(train=2, test=1, size=32, test_size=64, weathers=["snow"]))
    demo.check_shard_set(shards)  # another size, the same looks: reused
    manifest = json.loads((shards / "manifest.json").read_text())
    for edit, named in ((lambda spec: spec.update(texture_fraction=0.0), "texture_fraction 0.0 (now 0.3)"),
                        (lambda spec: spec.pop("texture_fraction"), "texture_fraction unset (now 0.3)")):
        old = json.loads(json.dumps(manifest))
        edit(old["created_by"]["spec"])
        (shards / "manifest.json").write_text(json.dumps(old))
        with pytest.raises(UserError, match="older `shards synth`") as err:
            demo.check_shard_set(shards)
        assert named in str(err.value) and "delete it" in str(err.value)
