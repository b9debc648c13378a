"""Outputs are written as new files: a symlink where an output goes (in a run folder someone else made) is
replaced, never written through, and the file it points to is left as it was."""

import stat

import pytest

from bootstrap.metrics import MetricsLog
from students.run_folder import RunFolder
from data.outputs import SymlinkRefused, new_files_into, open_append, replacing, write_text
from eval.__main__ import main as eval_main
from students.export import main as export_main
from test_eval import _one_thread, clip_pair, demo, write_run  # noqa: F401 (fixtures)


def plant(link, victims, name):
    """A symlink `link` to a file of ours outside the folder, holding `name`'s original contents."""
    victim = victims / name
    victim.write_text(f"the user's own {name}\n")
    link.symlink_to(victim)
    return victim


def assert_untouched(victim, name):
    assert victim.read_text() == f"the user's own {name}\n"


@pytest.fixture
def run(clip_pair, demo, tmp_path):  # noqa: F811
    teacher, student = clip_pair
    run = tmp_path / "run"
    write_run(run, teacher, student, {"data": str(demo / "val"), "probe": False, "cost": False, "num_workers": 0,
                                      "roi_images": 1})
    return run


def test_python_m_eval_replaces_symlinks_in_the_run_folder(run, tmp_path):
    victims = tmp_path / "elsewhere"
    victims.mkdir()
    names = ("report.md", "report.json", "rois.png")
    planted = {name: plant(run / name, victims, name) for name in names}
    assert eval_main([str(run), "--no-progress", "--no-cost"]) == 0
    for name in names:
        assert_untouched(planted[name], name)
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0
    assert (run / "report.md").read_text().startswith("#")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_an_export_replaces_symlinks_in_its_folder(run, tmp_path, capsys):
    victims = tmp_path / "elsewhere"
    victims.mkdir()
    out = run / "export_openclip"
    out.mkdir()
    readme = plant(out / "README.md", victims, "README.md")
    assert export_main([str(run)]) == 0, capsys.readouterr().err
    assert_untouched(readme, "README.md")
    assert not (out / "README.md").is_symlink() and "load_openclip_export" in (out / "README.md").read_text()


def test_a_run_replaces_symlinks_to_its_student_files_and_refuses_a_symlinked_log(clip_pair, tmp_path):  # noqa: F811
    _, student = clip_pair
    victims = tmp_path / "elsewhere"
    victims.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    names = ("student.safetensors", "student_config.json", "pretrained_cfg.json")
    planted = {name: plant(out / name, victims, name) for name in names}
    RunFolder(out).write_student(student, student.state_dict())
    for name in names:
        assert_untouched(planted[name], name)
        assert not (out / name).is_symlink()

    log = plant(out / "metrics.jsonl", victims, "metrics.jsonl")

    class Main:
        is_main_process = True

        def log(self, *args, **kwargs):
            pass

    metrics = MetricsLog(Main(), out / "metrics.jsonl", resume_step=None)  # truncating: a new file
    assert_untouched(log, "metrics.jsonl")
    (out / "metrics.jsonl").unlink()
    plant(out / "metrics.jsonl", victims, "metrics.jsonl")
    with pytest.raises(SymlinkRefused, match="metrics.jsonl is a symlink") as info:
        metrics.log(1, {"loss": 1.0})  # appending: refused
    assert "\n" not in str(info.value)
    assert_untouched(log, "metrics.jsonl")


def test_replacing_leaves_nothing_behind_on_an_error_and_the_usual_file_mode(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []
    write_text(target, "whole")
    (tmp_path / "plain.txt").write_text("plain")  # what open() gives under this umask
    assert target.read_text() == "whole"
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_new_files_into_moves_a_multi_file_writers_output_over_symlinks(tmp_path):
    victims = tmp_path / "elsewhere"
    victims.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    victim = plant(out / "tokenizer.json", victims, "tokenizer.json")
    with new_files_into(out) as tmp:
        (tmp / "tokenizer.json").write_text("{}")
        (tmp / "vocab.txt").write_text("a\n")
    assert_untouched(victim, "tokenizer.json")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "vocab.txt"]
    assert (out / "tokenizer.json").read_text() == "{}" and not (out / "tokenizer.json").is_symlink()


def test_open_append_appends_to_a_file_and_creates_one(tmp_path):
    path = tmp_path / "log.txt"
    for line in ("a\n", "b\n"):
        with open_append(path) as f:
            f.write(line)
    assert path.read_text() == "a\nb\n"
