import pytest

from wbc_spark.config import ConfigError, load_config, parse_override


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  lr: 0.01\nmodel:\n  freeze_until: inception4c\n")
    c = load_config(f, ["train.epochs=2", "data.lake=/x"])
    assert c.train.epochs == 2
    assert c.train.lr == 0.01
    assert c.model.freeze_until == "inception4c"
    assert c.data.lake == "/x"
    assert c.train.batch_size == 32  # default kept


def test_unknown_key_is_an_error_naming_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'.*epochs"):
        load_config(None, ["train.epoch=3"])
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(f)


@pytest.mark.parametrize("override, match", [
    ("train.epochs=many", "must be a number"),
    ("train.use_gpu=maybe", "true or false"),
    ("train.use_gpu=true", "GPU training is not implemented yet"),
    ("model.freeze_until=inception9z", "choose none or one of"),
    ("model.source=hub", "choose one of bvlc, torchvision"),
    ("model.test_views=0", "choose 1 to 8"),
    ("model.test_views=9", "choose 1 to 8"),
    ("train.test_fold=5", "test_fold"),
    ("train.batch_size=33", "multiple of train.num_processes"),
    ("noequals", "section.key=value"),
    ("data.stain=macenko", "choose none or field"),
    ("data.framing=pad", "choose fit or reflect"),
    ("score.precision=fp16", "choose auto or fp32 or bf16 or int8"),
    ("score.trained_precision=int8", "choose auto or fp32 or bf16"),
    ("score.device=tpu", "choose cpu or cuda or auto"),
    ("train.frozen_precision=int8", "choose auto or fp32 or bf16"),
    ("train.int8_calibration=-1", "0 for none"),
    ("train.frozen_precision=fp16", "choose auto or fp32 or bf16"),
    ("train.step_precision=int8", "choose auto or fp32 or bf16"),
    ("augment.frame_edge=1.5", "a probability"),
    ("train.sampling=oversample", "choose shuffle or balanced"),
    ("train.selection=best", "choose pooled or lab_mean or loss or last"),
    ("augment.frame_edge_sides=5", "1..4"),
    ("augment.frame_edge_width=0.6", "under 0.5"),
    ("augment.density=-0.2", "0 \\(off\\) to 1.5"),
    ("score.tasks_per_core=0", "1 or more"),
    ("train.epochs=3.7", "a whole one"),
    ("classes=Neutrophil", "must be a list"),
    ("data.lake=[a, b]", "must be a string"),
    ("spark.conf=2g", "must be a mapping"),
])
def test_bad_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_int8_is_refused_on_a_gpu():
    for device in ("cuda", "auto"):
        with pytest.raises(ConfigError, match=f"score.precision=int8 with score.device={device}"):
            load_config(None, ["score.precision=int8", f"score.device={device}"])
    assert load_config(None, ["score.precision=int8", "score.device=cpu"]).score.device == "cpu"


def test_a_spark_setting_merges_into_spark_conf(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("spark:\n  conf:\n    spark.driver.memory: 4g\n")
    c = load_config(conf, ["spark.conf.spark.executor.memory=2g", "train.epochs=3.0"])
    assert c.spark.conf == {"spark.driver.memory": "4g", "spark.executor.memory": "2g"}
    assert c.train.epochs == 3 and isinstance(c.train.epochs, int)


def test_override_values_are_typed():
    assert parse_override("train.use_gpu=true") == {"train": {"use_gpu": True}}
    c = load_config(None, ["train.lr=1e-3", "train.epochs=3", "train.use_gpu=false"])
    assert c.train.lr == 1e-3 and c.train.epochs == 3 and c.train.use_gpu is False


def test_lab_name_comes_from_the_config_or_the_lake(tmp_path):
    from wbc_spark.config import load_config
    from wbc_spark.ingest import lab_name

    assert lab_name(load_config(None, ["data.source=krd_wbc"])) == "KRD-WBC"
    assert lab_name(load_config(None, ["data.source=folder", "data.lake=/x/lab_b/"])) == "lab_b"
    assert lab_name(load_config(None, ["data.source=manifest",
                                       "data.lake=/x/PBC-dev/labels.csv"])) == "PBC-dev"
    assert lab_name(load_config(None, ["data.source=folder", "data.lake=/x/y",
                                       "data.lab=Hospital 3"])) == "Hospital 3"


def test_other_labels_may_not_repeat_a_class():
    import pytest

    from wbc_spark.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="other_labels repeats classes"):
        load_config(None, ["other_labels=[neutrophil, Platelet]"])


def test_a_python_worker_s_error_is_reported_by_what_it_raised():
    from wbc_spark.session import one_line

    class PythonException(Exception):  # as pyspark passes a worker's failure up
        pass

    worker = PythonException(
        "\n  An exception was thrown from the Python worker. Please see the stack trace below.\n"
        "Traceback (most recent call last):\n"
        '  File "/x/score.py", line 9, in classify\n'
        "    raise images.BadImage('x')\n"
        "wbc_spark.images.BadImage: first\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/x/transfer.py", line 101, in resolve_device\n'
        "RuntimeError: score.device=cuda: no CUDA device\n\n"
        "\tat org.apache.spark.api.python.BasePythonRunner.handle(PythonRunner.scala:572)\n"
        "ValueError: not the worker's\n")
    assert one_line(worker) == "RuntimeError: score.device=cuda: no CUDA device"
    assert one_line(ValueError("plain: first line\nsecond")) == "ValueError: plain: first line"
