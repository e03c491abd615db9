"""The stage registry: every stage exists, with its kind and config class."""

def test_every_registered_stage_exists_and_the_cli_reads_the_registry():
    from weatherkd import stages

    assert sorted(stages.STAGES) == sorted(["shards", "teacher", "distill", "vq", "adapter", "synth", "dream", "cache-teacher", "prune",
                                            "eval", "restore", "export", "bench", "plan", "report", "demo"])
    for name, stage in stages.STAGES.items():
        module = stage.load()  # every stage is built
        assert hasattr(module, "run" if stage.configured else "run_cli"), name
        if stage.configured:
            assert stage.config_class is module.Config
    assert stages.of_kind("train") == ["teacher", "distill", "vq", "adapter"]
    assert stages.of_kind("job") == ["synth", "dream", "cache-teacher"]
