"""hub_spawner/jobfiles.py: job paths, path validation and which old job files are deleted."""

import shlex
import subprocess

import pytest

from hub_spawner.jobfiles import (
    JobPaths,
    RemoteEntry,
    check_remote_path,
    expired_entries,
    job_paths,
    remove_command,
)

DAY = 86400.0
NOW = 1_800_000_000.0
UID = 1001
CURRENT = RemoteEntry("jupyterhub-alice-default-ffffffff", NOW, UID, True, False)


def job_dir(number: int, age: float, uid: int | None = UID) -> RemoteEntry:
    return RemoteEntry(f"jupyterhub-alice-default-{number:08x}", NOW - age, uid, True, False)


def test_job_paths_are_one_directory_per_job():
    paths = job_paths("/home/alice/.hub-spawner", "jupyterhub-alice-default-0a1b2c3d")
    directory = "/home/alice/.hub-spawner/jupyterhub-alice-default-0a1b2c3d"
    assert paths == JobPaths(directory, f"{directory}/job.sh", f"{directory}/job.out",
                             f"{directory}/server.env")


@pytest.mark.parametrize("job_name", ["../etc", "jupyterhub-alice-default-0a1b2c3d\n",
                                      "jupyterhub-a/b-default-0a1b2c3d", "x", "",
                                      "jupyterhub-alice-default-0A1B2C3D"])
def test_job_paths_refuse_a_name_that_is_not_ours(job_name):
    with pytest.raises(ValueError, match="not a job name of ours"):
        job_paths("/home/alice/.hub-spawner", job_name)


@pytest.mark.parametrize("path", ["relative/dir", "/home/al ice", "/home/alice\n", "/home/$(id)",
                                  "/home/alice;rm", "/home/ünï", "", "//server/share", "~/x"])
def test_check_remote_path_refuses_what_we_do_not_put_in_a_script(path):
    with pytest.raises(ValueError, match="set remote_state_dir"):
        check_remote_path(path)


def test_check_remote_path_normalises():
    assert check_remote_path("/home/alice/./.hub-spawner/") == "/home/alice/.hub-spawner"
    assert check_remote_path("/home/alice/../bob") == "/home/bob"


def test_only_the_newest_are_kept_and_only_old_ones_deleted():
    entries = [job_dir(n, age=(10 + n) * DAY) for n in range(15)] + [CURRENT]
    expired = expired_entries(entries, keep=10, current=CURRENT, min_age=8 * DAY)
    assert expired == sorted(job_dir(n, 0).name for n in range(10, 15))


def test_the_current_job_never_counts_and_is_never_chosen():
    entries = [CURRENT, job_dir(1, 30 * DAY)]
    assert expired_entries(entries, keep=0, current=CURRENT, min_age=0) == [job_dir(1, 0).name]
    assert expired_entries([CURRENT], keep=0, current=CURRENT, min_age=0) == []


def test_a_job_that_may_still_run_is_never_deleted_whatever_keep_says():
    entries = [job_dir(1, 2 * DAY), job_dir(2, 30 * DAY)]
    assert expired_entries(entries, keep=0, current=CURRENT, min_age=7 * DAY) == [
        job_dir(2, 0).name]


def test_other_owners_unknown_owners_and_other_names_are_never_chosen():
    entries = [
        job_dir(1, 30 * DAY, uid=0),
        job_dir(2, 30 * DAY, uid=None),
        RemoteEntry("certs-alice-default-0a1b2c3d", NOW - 30 * DAY, UID, True, False),
        RemoteEntry("jupyterhub-alice-default-0a1b2c3d.tmp", NOW - 30 * DAY, UID, True, False),
        RemoteEntry("notes.txt", NOW - 30 * DAY, UID, False, True),
        RemoteEntry("*", NOW - 30 * DAY, UID, True, False),
        RemoteEntry("..", NOW - 30 * DAY, UID, True, False),
    ]
    assert expired_entries(entries, keep=0, current=CURRENT, min_age=0) == []


def test_a_link_named_like_a_job_directory_is_not_followed_or_chosen():
    link = RemoteEntry(job_dir(1, 0).name, NOW - 30 * DAY, UID, False, False)  # lstat: a link
    assert expired_entries([link], keep=0, current=CURRENT, min_age=0) == []


def test_files_of_the_earlier_layout_go_by_job():
    old = "jupyterhub-alice-default-00000001"
    entries = [
        RemoteEntry(f"{old}.out", NOW - 30 * DAY, UID, False, True),
        RemoteEntry(f"{old}.sh", NOW - 30 * DAY, UID, False, True),
        RemoteEntry(f"{old}.env", NOW - 30 * DAY, UID, False, True),
        RemoteEntry("jupyterhub-alice-default-00000002.out", NOW - 1 * DAY, UID, False, True),
    ]
    assert expired_entries(entries, keep=1, current=CURRENT, min_age=0) == [
        f"{old}.env", f"{old}.out", f"{old}.sh"]


def test_a_job_is_as_young_as_its_newest_file():
    old = "jupyterhub-alice-default-00000001"
    entries = [RemoteEntry(f"{old}.sh", NOW - 30 * DAY, UID, False, True),
               RemoteEntry(f"{old}.out", NOW - 1 * DAY, UID, False, True)]
    assert expired_entries(entries, keep=0, current=CURRENT, min_age=7 * DAY) == []


def test_remove_command_is_one_rm_of_exact_quoted_paths():
    command = remove_command("/home/alice/.hub-spawner", [job_dir(1, 0).name,
                                                          "jupyterhub-alice-default-00000002.out"])
    assert shlex.split(command) == [
        "rm", "-rf", "--",
        "/home/alice/.hub-spawner/jupyterhub-alice-default-00000001",
        "/home/alice/.hub-spawner/jupyterhub-alice-default-00000002.out",
    ]
    assert remove_command("/home/alice/.hub-spawner", []) == ""


@pytest.mark.parametrize("name", ["..", "*", "jupyterhub-*", "a/b", "../jupyterhub-a-b-00000001",
                                  "jupyterhub-alice-default-00000001/..", "x; rm -rf ~"])
def test_remove_command_refuses_anything_but_our_names(name):
    with pytest.raises(ValueError, match="not a job file of ours"):
        remove_command("/home/alice/.hub-spawner", [name])


def test_remove_command_deletes_exactly_the_chosen_entries(tmp_path):
    keep = tmp_path / "jupyterhub-alice-default-00000002"
    gone = tmp_path / "jupyterhub-alice-default-00000001"
    for directory in (keep, gone):
        directory.mkdir()
        (directory / "job.out").write_text("x")
    subprocess.run(["bash", "-c", remove_command(str(tmp_path), [gone.name])], check=True)
    assert keep.exists() and not gone.exists()
