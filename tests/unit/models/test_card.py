"""The model card (README.md) in an exported model folder: hub front matter that parses, what the
model is and how it was made, eval's table added once per evaluation, and its copy beside an ONNX file."""

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: conftest's make_set
from conftest import make_set  # noqa: E402

from weatherkd import models  # noqa: E402
from weatherkd.io import sha256_file  # noqa: E402
from weatherkd.models import card  # noqa: E402
from weatherkd.commands import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A student exported as Engine.export exports one: models.save, then the card, from its config."""
    root = tmp_path_factory.mktemp("card")
    shards = root / "set"
    make_set(shards, {("train", "snow"): 2, ("test", "snow"): 2, ("test", "rain_haze"): 2}, size=24,
             weathers=("rain_haze", "snow"))
    teacher = models.save(models.build("residual_cnn", width=4, depth=2), root / "teacher" / "model")
    config = {"out_dir": str(root / "kd"), "seed": 3, "objective": "kd", "teacher": str(teacher),
              "data": {"train_shards": str(shards), "batch_size": 4, "weathers": ["rain_haze", "snow"]},
              "train": {"max_steps": 7, "lr": 1e-3, "mixed_precision": "no"}, "model": {"arch": "unet_bn", "size": "tiny"}}
    model_dir = models.save(models.build("unet_bn", size="tiny"), root / "kd" / "model",
                            extra={"random_init": True, "step": 7, "weathers": ["rain_haze", "snow"],
                                   "objective": "kd", "teacher": str(teacher)})
    card.write(model_dir, "distill", config)
    return model_dir, shards, teacher


def test_the_card_says_what_the_model_is_and_how_it_was_made(exported):
    model_dir, shards, teacher = exported
    meta, body = card.split_front_matter((model_dir / "README.md").read_text())
    assert meta["library_name"] == "weatherkd" and meta["license"] == "apache-2.0"
    assert meta["metrics"] == ["psnr", "ssim"] and meta["datasets"] == ["set"]
    assert {"image-restoration", "distill", "kd", "unet_bn", "random-init"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "image-to-image"
    params = sum(p.numel() for p in models.load(model_dir).parameters())
    for line in (f"| arch | `unet_bn` |", "| size | tiny |", f"| parameters | {params:,} ", "| GFLOPs@256 | 0.203 |",
                 "| stage | `weatherkd distill` |", "| objective | kd |", "| steps | 7 |", "| seed | 3 |",
                 f"weights sha256 `{sha256_file(teacher / 'model.safetensors')}`",
                 f"manifest sha256 `{sha256_file(shards / 'manifest.json')}`",
                 f"sha256 `{sha256_file(model_dir / 'model.safetensors')}`", "**random** (allow_random_init)",
                 "Built with random pretrained towers", f"weatherkd restore --model", "weatherkd export --model",
                 "Apache-2.0", "- Training data (`set`): not recorded in the set's manifest.\n"):
        assert line in body, line
    config = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config)["objective"] == "kd"  # the resolved config, whole
    assert card.NOT_EVALUATED in body


def test_eval_adds_its_table_once_per_evaluation(exported, tmp_path):
    model_dir, shards, _ = exported
    for _ in range(2):  # a rerun replaces its section
        evaluate.evaluate(model_dir, shards, tmp_path / "rgb", tracker="none", num_workers=0)
    evaluate.evaluate(model_dir, shards, tmp_path / "y", protocol="y", tracker="none", num_workers=0)
    meta, body = card.split_front_matter((model_dir / "README.md").read_text())
    assert body.count("<!-- weatherkd-eval ") == 2 and body.count("protocol `rgb`, 4 samples") == 1
    assert body.count("protocol `y`, 4 samples") == 1 and card.NOT_EVALUATED not in body
    section = body.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "| identity |" in section and "Clean in" in section  # the eval table sits in its section
    assert body.index("## Evaluation") < body.index("## Use")
    results = meta["model-index"][0]["results"]
    assert [r["metrics"][0]["name"] for r in results] == ["mean PSNR (rgb)", "mean PSNR (y)"]
    assert all(r["dataset"] == {"name": "set", "type": "weatherkd-shards", "split": "test"} for r in results)


def test_the_card_goes_beside_an_onnx_file_with_the_exports_record(exported, tmp_path):
    model_dir, _, _ = exported
    record = {"format": "onnx", "opset": 18, "sha256": "ab" * 32, "fixed_size": None, "tile": 512, "tile_overlap": 64,
              "inputs": {"image": ["batch", 3, "height", "width"]},
              "check": {"sizes": [[96, 128], [256, 256]], "max_abs_error": [3e-7, 5e-7], "tolerance": 1e-4,
                        "onnx_checker": "passed", "runtime": "onnxruntime CPUExecutionProvider"},
              "latency": {"size": [256, 256], "torch_eager_ms": 10.0, "onnxruntime_ms": 4.0}}
    dest = card.export_copy(model_dir, tmp_path / "student.onnx", record)
    assert dest == tmp_path / "student.onnx.md"
    meta, body = card.split_front_matter(dest.read_text())
    assert "onnx" in meta["tags"] and meta["library_name"] == "weatherkd"
    assert "## Export: `student.onnx`" in body and "opset 18" in body and "max abs error 5.00e-07" in body
    assert body.index("## Export") < body.index("## Use") and "| arch | `unet_bn` |" in body
    # A folder exported before cards existed: the copy is rendered from the folder, which is left alone.
    bare = models.save(models.build("residual_cnn", width=4, depth=2), tmp_path / "old" / "model")
    card.export_copy(bare, tmp_path / "old.onnx", record)
    assert not (bare / "README.md").exists() and "| arch | `residual_cnn` |" in (tmp_path / "old.onnx.md").read_text()


def test_the_embedded_photos_licences_are_named_with_where_each_is_recorded():
    from weatherkd.data.photo_set import builtin_catalogue

    catalogue = builtin_catalogue()
    names = list(catalogue)[:3]
    text = card._data_licence({"source": "builtin", "train_photos": names[:2], "test_photos": names[2:]}, 0)
    assert "`weatherkd/data/photos/PHOTOS.md` and `photos.json`" in text and "attribution" in text
    assert all(n in text and catalogue[n]["license"] in text for n in names)
    # the held-out set's greyscale photos come from scikit-image, which states their licences itself
    held = card._data_licence({"source": "builtin-other", "photos": ["camera", names[0]]}, 0)
    assert "skimage.data" in held and catalogue[names[0]]["license"] in held
